"""Trained models as cached artifacts: a safetensors file plus a JSON sidecar holding the settings that
shaped it. A model is reused only when its sidecar's settings equal the requested ones, so the settings
must hold everything that changes the result and nothing that does not (where it ran, on how many CPUs).
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from distmeta.io import atomic_path, write_json

SCALING = ("use_gpu", "cpus_per_worker", "parallel")  # where a training runs, not what it learns


def shaping(config) -> dict:
    """A training config as part of a model's cache key: without its scaling settings, so moving the same
    run onto GPUs reuses its models. (`num_workers` stays: each worker takes its share of every epoch's
    batches, so the worker count changes the steps taken.)"""
    return {k: v for k, v in asdict(config).items() if k not in SCALING}


def is_done(path, settings: dict) -> bool:
    """Whether a model with exactly these settings is saved at `path`."""
    sidecar = Path(path).with_suffix(".json")
    return Path(path).is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("settings") == settings


def save_model(path, state: dict[str, torch.Tensor], sidecar: dict) -> None:
    """The model, then its sidecar: a sidecar on disk means its model is complete (both atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_json(path.with_suffix(".json"), sidecar)
