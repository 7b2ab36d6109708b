"""Speaker profiles: a speaker's enrollment pairs, encoded once, for the meta-trained speech LM to read in context.

    base = SpeakerBase.load("runs/icl-models/speech_lm-<hash>-TU_LU.safetensors")   # or models:/distmeta-speaker/1
    tensors, meta = enroll(base, waveforms, words)          # 1..max_shots (7) pairs: frames + label words
    probs = probabilities(base, waveforms, tensors, meta)   # [N, 7] over the label words

Nothing adapts: a speaker profile is the pairs themselves, their speech already passed through the frozen
encoder (the upstream and layer the speech LM was trained on, from its sidecar), so a prediction only
encodes the new clip. The speech LM reads exactly what the tables' evaluation gives it
(`speaker.evaluate.predict`): the instruction, the pairs in their order, then the target; the answer is the
label word with the highest log-likelihood, and the probabilities are those log-likelihoods normalised over
the closed set of label words.
"""

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from distmeta import __version__
from distmeta.data.speakers import WORDS
from distmeta.features import AudioBank, FrameBank
from distmeta.models.speech_lm import SpeechLM
from distmeta.models.upstream import Upstream, UpstreamConfig
from distmeta.profiles.store import csv_rows, file_digest, model_file


@dataclass
class SpeakerBase:
    """A MetaICL speech LM as saved by jobs/metaicl_train.py, with the frozen encoder its frames came from."""
    model: SpeechLM
    upstream: Upstream
    layer: int
    digest: str
    path: Path
    device: torch.device

    kind = "speaker"

    @classmethod
    def load(cls, path, device="cpu") -> "SpeakerBase":
        from distmeta.speaker.metaicl import load_speech_lm

        path = model_file(path, "speaker")
        saved = json.loads(path.with_suffix(".json").read_text())
        if "encoder_dim" not in saved:
            raise ValueError(f"{path}: not a speech LM (rerun jobs/metaicl_train.py to write one)")
        settings = saved["settings"]
        encoder = UpstreamConfig(**settings["upstream"])
        beside = path.parent / Path(encoder.path).name
        if encoder.name == "speech_encoder" and beside.is_file():  # registered together (models:/), or moved together
            encoder = replace(encoder, path=str(beside))
        device = torch.device(device)
        upstream = Upstream(encoder).eval().to(device)
        return cls(load_speech_lm(path).to(device), upstream, settings["encoder_layer"], file_digest(path), path, device)

    @property
    def words(self) -> list[str]:
        return list(self.model.words)

    labels = words

    def frames(self, waveforms: dict) -> FrameBank:
        """The frozen encoder's frames of these waveforms (id -> [T]), as the job computed its training frames."""
        return FrameBank(self.upstream, AudioBank.of_waveforms(waveforms), self.layer)


def label_word(label: str, words: list[str]) -> str | None:
    """The model's word for `label`: a word itself (any case) or the class name it stands for (happy -> Joy)."""
    by_name = {w.lower(): w for w in words} | {c: w for c, w in WORDS.items() if w in words}
    return by_name.get(label.strip().lower())


def read_pairs(path, words: list[str], name=None) -> list[tuple[str, str]]:
    """A speaker's enrollment pairs from a CSV with columns path,label (one label per clip: a label word of the
    model, or its class name); relative paths are relative to the CSV. Errors name the line."""
    pairs = []
    for line, row, clip in csv_rows(path, ("path", "label"), name):
        word = label_word(row["label"], words)
        if word is None:
            raise ValueError(f"{name or path}, line {line}: label {row['label']!r} is not one of {', '.join(words)}")
        pairs.append((clip, word))
    if not pairs:
        raise ValueError(f"{name or path}: no pairs")
    return pairs


def check_pairs(base: SpeakerBase, count: int) -> None:
    """The speech LM reads 1 to max_shots pairs; checked before any clip is decoded."""
    most = base.model.config.max_shots
    if not 1 <= count <= most:
        raise ValueError(f"{count} enrollment pairs; the speech LM reads 1 to {most} (max_shots)")


def enroll(base: SpeakerBase, waveforms: list[torch.Tensor], words: list[str]) -> tuple[dict, dict]:
    """(the pairs' frames, profile metadata) from 1..max_shots waveforms (16 kHz) and their label words,
    kept in their order."""
    check_pairs(base, len(waveforms))
    tensors = dict(base.frames({f"pair/{i}": w for i, w in enumerate(waveforms)}).items)
    meta = {"kind": "speaker", "base": base.digest, "base_path": str(base.path.resolve()), "shots": len(waveforms),
            "labels": list(words), "classes": base.words, "distmeta": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return tensors, meta


def probabilities(base: SpeakerBase, waveforms: list[torch.Tensor], tensors: dict | None = None, meta: dict | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """[N, W] probabilities over the label words of the waveforms (16 kHz); without a profile the speech LM
    reads no pairs (0-shot)."""
    shots = (meta or {}).get("labels", [])
    pair_ids = [f"pair/{i}" for i in range(len(shots))]
    out = []
    for start in range(0, len(waveforms), batch_size):
        chunk = [f"clip/{i}" for i in range(start, min(start + batch_size, len(waveforms)))]
        bank = base.frames(dict(zip(chunk, waveforms[start:start + batch_size])))
        bank.items.update({p: (tensors or {})[p] for p in pair_ids})
        batch = {k: v.to(base.device) if torch.is_tensor(v) else v
                 for k, v in base.model.collate([base.model.prompt(shots)] * len(chunk)).items()}
        speech = bank.batch([u for target in chunk for u in [*pair_ids, target]])  # reading order: pairs, target
        with torch.no_grad():
            scores = base.model.eval().score(batch, speech["frames"].to(base.device), speech["frame_mask"].to(base.device))
        out.append(torch.softmax(scores, -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(base.words)), dtype=np.float32)
