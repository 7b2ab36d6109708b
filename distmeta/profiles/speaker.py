"""Speaker profiles: a speaker's enrollment pairs, encoded once, for the meta-trained speech LM to read in context.

    base = SpeakerBase.load("runs/icl-models/speech_lm-<hash>-TU_LU.safetensors")   # or models:/distmeta-speaker/1
    tensors, meta = enroll(base, read_pairs("pairs.csv"))     # 1..max_shots (7) pairs: frames + label words
    rows = predict(base, ["a.wav"], tensors, meta)            # the top label and its probability, one per label

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

import torch

from distmeta import __version__
from distmeta.data.audio import AudioError, load_audio
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

    @classmethod
    def load(cls, path) -> "SpeakerBase":
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
        upstream = Upstream(encoder).eval()
        return cls(load_speech_lm(path), upstream, settings["encoder_layer"], file_digest(path), path)

    @property
    def words(self) -> list[str]:
        return list(self.model.words)

    def frames(self, waveforms: dict) -> FrameBank:
        """The frozen encoder's frames of these waveforms (id -> [T]), as the job computed its training frames."""
        return FrameBank(self.upstream, AudioBank.of_waveforms(waveforms), self.layer)


def label_word(label: str, words: list[str]) -> str | None:
    """The model's word for `label`: a word itself (any case) or the class name it stands for (happy -> Joy)."""
    by_name = {w.lower(): w for w in words} | {c: w for c, w in WORDS.items() if w in words}
    return by_name.get(label.strip().lower())


def read_pairs(path, words: list[str]) -> list[tuple[str, str]]:
    """A speaker's enrollment pairs from a CSV with columns path,label (one label per clip: a label word of the
    model, or its class name); relative paths are relative to the CSV. Errors name the line."""
    pairs = []
    for line, row, clip in csv_rows(path, ("path", "label")):
        word = label_word(row["label"] or "", words)
        if word is None:
            raise ValueError(f"{path}, line {line}: label {row['label']!r} is not one of {', '.join(words)}")
        pairs.append((clip, word))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def enroll(base: SpeakerBase, pairs: list[tuple[str, str]]) -> tuple[dict, dict]:
    """(the pairs' frames, profile metadata): 1..max_shots pairs, kept in their order."""
    most = base.model.config.max_shots
    if not 1 <= len(pairs) <= most:
        raise ValueError(f"{len(pairs)} enrollment pairs; the speech LM reads 1 to {most} (max_shots)")
    waveforms = {}
    for i, (clip, _) in enumerate(pairs):
        try:
            waveforms[f"pair/{i}"] = load_audio(clip)
        except AudioError as err:
            raise ValueError(f"enrollment clip: {err}") from None
    tensors = dict(base.frames(waveforms).items)
    meta = {"kind": "speaker", "base": base.digest, "base_path": str(base.path.resolve()), "shots": len(pairs),
            "labels": [word for _, word in pairs], "classes": base.words, "distmeta": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return tensors, meta


def predict(base: SpeakerBase, files, tensors: dict | None = None, meta: dict | None = None, batch_size: int = 16,
            progress=None) -> list[dict]:
    """One row per file: path, a probability per label word, the top `label` and its `score`, or the error
    that kept the file from being read. Without a profile the speech LM reads no pairs (0-shot)."""
    shots = (meta or {}).get("labels", [])
    pair_ids = [f"pair/{i}" for i in range(len(shots))]
    rows, good = {}, {}
    for file in map(str, files):
        try:
            good[file] = load_audio(file)
        except AudioError as err:
            rows[file] = {"path": file, "error": str(err)}
    ids = list(good)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        bank = base.frames({u: good[u] for u in chunk})
        bank.items.update({p: (tensors or {})[p] for p in pair_ids})
        batch = base.model.collate([base.model.prompt(shots)] * len(chunk))
        speech = bank.batch([u for target in chunk for u in [*pair_ids, target]])  # reading order: pairs, target
        with torch.no_grad():
            probs = torch.softmax(base.model.eval().score(batch, speech["frames"], speech["frame_mask"]), -1)
        for file, p in zip(chunk, probs.tolist()):
            top = max(range(len(p)), key=p.__getitem__)
            rows[file] = {"path": file, **dict(zip(base.words, p)), "label": base.words[top], "score": p[top], "error": ""}
        if progress:
            progress(min(start + batch_size, len(ids)), len(ids))
    return [rows[file] for file in map(str, files)]
