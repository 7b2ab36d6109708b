"""Listener profiles: the meta-trained Meta-PerSER model adapted to one person's labelled clips.

    base = ListenerBase.load("runs/models/unseen/E1/meta-ini1-csmt1-da1-lslr1.safetensors")
    tensors, meta = enroll(base, read_labelled("my_labels.csv"))      # adapt as meta-test does
    rows = predict(base, ["a.wav", "b.wav"], tensors)                  # per-file probabilities and labels

Enrollment and prediction are exactly the meta-test protocol's Meta-PerSER (`metatest.adapted_probs`, split in two):
`metatest.adapt_to` on all K clips from the meta-trained parameters (`meta.test_adapt`: `meta.test_rate_steps`
steps with the learned per-layer per-step rates, then the whole model fine-tuned for `meta.test_steps` AdamW
steps; or `meta.test_steps` steps with the learned rates alone).
A profile holds the adapted parameters: every one but the frozen conv encoder's (finetune), or the
scope's trainable ones (rates: the head, for scope `head`).
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
from distmeta.data.audio import AudioError, load_audio
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

    @classmethod
    def load(cls, path) -> "ListenerBase":
        """From a meta-trained model file, or a registered one (`models:/distmeta-listener/<version>`)."""
        path = model_file(path, "listener")
        sidecar = path.with_suffix(".json")
        saved = json.loads(sidecar.read_text())
        settings = saved["settings"]
        if settings.get("saved") != "MetaModel":
            raise ValueError(f"{path}: not a Meta-PerSER meta-model (rerun jobs/meta_train.py to write one)")
        config = MetaConfig(**settings["meta"])
        meta = build_meta_model(UpstreamConfig(**settings["upstream"]), None, replace(config, ini=False))
        meta.load_state_dict(load_file(str(path)))  # train mode, as the protocol adapts it
        return cls(meta, config, saved.get("max_seconds"), file_digest(path), path)

    def bank(self, waveforms: dict):
        """What the meta-model reads for these waveforms at enrollment and prediction (make_bank's `test`)."""
        inputs = input_bank(self.meta.model.upstream, AudioBank.of_waveforms(waveforms))
        return make_bank(self.meta, None, list(waveforms), self.config, self.max_seconds, inputs, test=True)


def read_labelled(path) -> list[tuple[str, np.ndarray]]:
    """A person's labelled clips from a CSV with the manifest's `path` and `labels` columns (labels joined by
    ';'); relative paths are relative to the CSV. Errors name the line."""
    clips = []
    for line, row, clip in csv_rows(path, ("path", "labels")):
        names, _, errors = parse_labels(row["labels"])
        if errors:
            raise ValueError(f"{path}, line {line}: {errors[0]}")
        if not names:
            raise ValueError(f"{path}, line {line}: no label in the nine classes")
        clips.append((clip, np.array([float(c in names) for c in CLASSES], dtype=np.float32)))
    if not clips:
        raise ValueError(f"{path}: no clips")
    return clips


def enroll(base: ListenerBase, clips: list[tuple[str, np.ndarray]], kind: str = "listener") -> tuple[dict, dict]:
    """(adapted parameters, profile metadata) from a person's labelled clips; any K >= 1."""
    if len(clips) < FEW_CLIPS:
        warnings.warn(f"enrolling with {len(clips)} clips; Meta-PerSER was meta-trained with K={base.config.shots} "
                      f"and is unreliable below {FEW_CLIPS}", stacklevel=2)
    waveforms = {}
    for clip, _ in clips:
        try:
            waveforms[clip] = load_audio(clip, max_seconds=base.max_seconds)
        except AudioError as err:
            raise ValueError(f"enrollment clip: {err}") from None
    bank = base.bank(waveforms)
    targets = torch.as_tensor(np.stack([t for _, t in clips]))
    adapted = adapt_to(base.meta, base.config, bank.batch([c for c, _ in clips]), targets)
    meta = {"kind": kind, "base": base.digest, "base_path": str(base.path.resolve()), "shots": len(clips),
            "classes": list(CLASSES), "steps": base.config.test_steps, "adapt": base.config.test_adapt,
            "rate_steps": base.config.test_rate_steps if base.config.test_adapt == "finetune" else 0, "distmeta": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return adapted, meta


def predict(base: ListenerBase, files, adapted: dict | None = None, batch_size: int = 32, progress=None) -> list[dict]:
    """One row per file: path, a probability per class, the predicted labels (every class above 1/C), or
    the error that kept the file from being read."""
    rows, good = {}, {}
    for file in map(str, files):
        try:
            good[file] = load_audio(file, max_seconds=base.max_seconds)
        except AudioError as err:
            rows[file] = {"path": file, "error": str(err)}
    ids = list(good)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        probs = query_probs(base.meta, base.bank({u: good[u] for u in chunk}), chunk, adapted).numpy()
        for file, p in zip(chunk, probs):
            rows[file] = {"path": file, **{c: float(v) for c, v in zip(CLASSES, p)},
                          "labels": ";".join(c for c, v in zip(CLASSES, p) if v > 1 / len(CLASSES)), "error": ""}
        if progress:
            progress(min(start + batch_size, len(ids)), len(ids))
    return [rows[file] for file in map(str, files)]
