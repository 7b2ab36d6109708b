"""Listener profiles: the meta-trained Meta-PerSER model adapted to one person's labelled clips.

    base = ListenerBase.load("runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors")
    tensors, meta = enroll(base, waveforms, targets)     # adapt as meta-test does (waveforms at 16 kHz)
    probs = probabilities(base, waveforms, tensors)      # [N, 9] class probabilities

Enrollment and prediction are exactly the meta-test protocol's Meta-PerSER (`metatest.adapted_probs`, split in two):
`metatest.adapt_to` on all K clips from the meta-trained parameters (`meta.test_adapt`: `meta.test_rate_steps`
steps with the learned per-layer per-step rates, then the whole model fine-tuned for `meta.test_steps` AdamW
steps; or `meta.test_steps` steps with the learned rates alone).
A profile holds the adapted parameters: every one but the frozen conv encoder's (finetune), or the
scope's trainable ones (rates: the head, for scope `head`). Reading files, labels and the output's shape are
`profiles.personalizer`'s.
"""

import json
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from distmeta import __version__
from distmeta.features import AudioBank, input_bank
from distmeta.labels import CLASSES, parse_labels
from distmeta.meta.maml import MetaModel
from distmeta.listener.metatest import adapt_to
from distmeta.meta.learner import MetaConfig, query_probs
from distmeta.listener.metatrain import build_meta_model, make_bank
from distmeta.models.upstream import UpstreamConfig
from distmeta.profiles.store import csv_rows, file_digest, model_file

FEW_CLIPS = 8  # below this many enrollment clips, a warning


@dataclass
class ListenerBase:
    """A meta-trained Meta-PerSER model as saved by jobs/meta_train.py (safetensors + JSON sidecar)."""
    meta: MetaModel
    config: MetaConfig
    max_seconds: float | None
    digest: str
    path: Path
    device: torch.device

    kind = "listener"
    labels = list(CLASSES)

    @classmethod
    def load(cls, path, device="cpu") -> "ListenerBase":
        """From a meta-trained model file, or a registered one (`models:/distmeta-listener/<version>`)."""
        path = model_file(path, "listener")
        saved = json.loads(path.with_suffix(".json").read_text())
        settings = saved["settings"]
        if settings.get("saved") != "MetaModel":
            raise ValueError(f"{path}: not a Meta-PerSER meta-model (rerun jobs/meta_train.py to write one)")
        config = MetaConfig(**settings["meta"])
        meta = build_meta_model(UpstreamConfig(**settings["upstream"]), None, replace(config, ini=False))
        meta.load_state_dict(load_file(str(path)))  # train mode, as the protocol adapts it
        device = torch.device(device)
        return cls(meta.to(device), config, saved.get("max_seconds"), file_digest(path), path, device)

    def cut(self, wav: torch.Tensor) -> torch.Tensor:
        """The part of a 16 kHz waveform the model was meta-trained to read (its sidecar's audio length cap)."""
        return wav[: int(self.max_seconds * 16_000)] if self.max_seconds else wav

    def bank(self, waveforms: dict):
        """What the meta-model reads for these waveforms at enrollment and prediction (make_bank's `test`)."""
        inputs = input_bank(self.meta.model.upstream, AudioBank.of_waveforms(waveforms))
        return make_bank(self.meta, None, list(waveforms), self.config, self.max_seconds, inputs, test=True)


def label_targets(labels: str, where: str) -> np.ndarray:
    """A clip's multi-hot target from its label text (classes or IEMOCAP names joined by ';')."""
    names, _, errors = parse_labels(labels)
    if errors:
        raise ValueError(f"{where}: {errors[0]}")
    if not names:
        raise ValueError(f"{where}: no label in the nine classes")
    return np.array([float(c in names) for c in CLASSES], dtype=np.float32)


def read_labelled(path, name=None) -> list[tuple[str, str]]:
    """A person's labelled clips from a CSV with the manifest's `path` and `labels` columns (labels joined by
    ';'); relative paths are relative to the CSV. Errors name the line."""
    clips = []
    for line, row, clip in csv_rows(path, ("path", "labels"), name):
        label_targets(row["labels"], f"{name or path}, line {line}")
        clips.append((clip, row["labels"]))
    if not clips:
        raise ValueError(f"{name or path}: no clips")
    return clips


def enroll(base: ListenerBase, waveforms: list[torch.Tensor], targets: np.ndarray, kind: str = "listener") -> tuple[dict, dict]:
    """(adapted parameters, profile metadata) from a person's waveforms (16 kHz) and their multi-hot
    targets [K, 9]; any K >= 1."""
    if len(waveforms) < FEW_CLIPS:
        warnings.warn(f"enrolling with {len(waveforms)} clips; Meta-PerSER was meta-trained with K={base.config.shots} "
                      f"and is unreliable below {FEW_CLIPS}", stacklevel=3)
    ids = [f"clip/{i}" for i in range(len(waveforms))]
    bank = base.bank({u: base.cut(w) for u, w in zip(ids, waveforms)})
    adapted = adapt_to(base.meta, base.config, bank.batch(ids), torch.as_tensor(np.asarray(targets)).to(base.device))
    meta = {"kind": kind, "base": base.digest, "base_path": str(base.path.resolve()), "shots": len(ids),
            "classes": list(CLASSES), "steps": base.config.test_steps, "adapt": base.config.test_adapt,
            "rate_steps": base.config.test_rate_steps if base.config.test_adapt == "finetune" else 0, "distmeta": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return adapted, meta


def probabilities(base: ListenerBase, waveforms: list[torch.Tensor], adapted: dict | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """[N, 9] class probabilities of the waveforms (16 kHz), with a person's adapted parameters or none."""
    if adapted is not None:
        adapted = {k: v.to(base.device) for k, v in adapted.items()}
    out = []
    for start in range(0, len(waveforms), batch_size):
        ids = [f"clip/{i}" for i in range(start, min(start + batch_size, len(waveforms)))]
        chunk = {u: base.cut(w) for u, w in zip(ids, waveforms[start:start + batch_size])}
        out.append(query_probs(base.meta, base.bank(chunk), ids, adapted).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), dtype=np.float32)
