"""Personalization from Python, one class for both kinds of person (`distmeta.Personalizer`).

    import distmeta
    p = distmeta.Personalizer.from_pretrained("models:/distmeta-listener/1")   # or a model file; device="cuda"
    alice = p.enroll(["a.wav", "b.wav"], ["angry", "sad;frustrated"], person="alice")   # saved in the store
    p.predict("c.wav", profile=alice, top_k=3)          # [{"label": "angry", "score": 0.41}, ...] sorted
    p.predict([samples, "d.flac"], profile="alice", sample_rate=16_000)   # a batch: one such list per clip
    p.classify("c.wav", profile="alice")                # {"scores": [...], "labels": [...]}: what the CLI and HTTP answer

A listener model (Meta-PerSER, `profiles.listener`) adapts to a person's labelled clips, any number of
labels each; a speaker model (the MetaICL speech LM, `profiles.speaker`) keeps 1..7 pairs, one label each,
and reads them in context. Clips are paths, a file's bytes, or samples with their `sample_rate`; every clip
is checked against `limits` (sample rate, length) on its header before it is decoded. `classify` is the one
output shape: `scores`, the labels sorted by probability as Hugging Face's pipelines give them, and for a
listener model `labels`, the multi-label decision (every class above 1/9, as the protocol scores).
"""

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distmeta.data.audio import AudioError, AudioLimits, read_clip
from distmeta.profiles import listener, speaker
from distmeta.profiles.store import ProfileError, ProfileStore, check_id, model_file


def load_base(model, device="cpu"):
    """The base model at `model` (a file or a models:/ URI): a speech LM (its sidecar names its encoder) is a
    speaker model, anything else must be a Meta-PerSER listener model."""
    found = model_file(model)
    if "encoder_dim" in json.loads(found.with_suffix(".json").read_text()):
        return speaker.SpeakerBase.load(found, device)
    return listener.ListenerBase.load(found, device)


def clip_names(clips: list) -> list:
    """What errors call each clip: its path, or its place in the list (bytes, samples)."""
    return [clip if isinstance(clip, (str, Path)) else f"clip {i}" for i, clip in enumerate(clips)]


@dataclass
class Profile:
    """What personalization made for one person: tensors (adapted parameters, or the pairs' frames) and the
    metadata naming the person, the kind and the base model's digest."""
    person: str | None
    tensors: dict = field(repr=False)
    meta: dict


class Personalizer:
    def __init__(self, base, store=None, limits: AudioLimits = AudioLimits(), max_clips: int | None = None,
                 source: str | None = None):
        self.base, self.store, self.limits, self.max_clips = base, ProfileStore(store), limits, max_clips
        # One computation at a time: adapted parameters are swapped into the one model for a call
        # (torch.func.functional_call) and s3prl collects hidden states in a per-model buffer; torch uses the
        # cores within a call. Threads may share a Personalizer (a server's replica does).
        self._computing = threading.Lock()
        self.source = source or str(base.path.resolve())  # what the store records as where the base model is

    @classmethod
    def from_pretrained(cls, model, device="cpu", store=None, **options) -> "Personalizer":
        """A meta-trained listener model or MetaICL speech LM: its file, or a `models:/` URI (name/version, or
        name@alias); `store`: the profile folder (default ~/.local/share/distmeta/profiles)."""
        source = str(model) if str(model).startswith("models:/") else str(Path(model).resolve())
        return cls(load_base(model, device), store, source=source, **options)

    @classmethod
    def for_profile(cls, person: str, store=None, model=None, device="cpu", **options) -> "Personalizer":
        """The base model a stored profile was enrolled on: `model` when given (checked by digest), else where
        the store last found that digest, else what it was enrolled from (a models:/ URI or a path), else
        the file's path at enrollment."""
        profiles = ProfileStore(store)
        meta = profiles.meta(person)
        record = profiles.base_record(meta["base"]) or {}
        for where in ([model] if model else [record.get("where"), meta.get("base_source"), meta.get("base_path")]):
            if where and (str(where).startswith("models:/") or Path(where).is_file()):
                found = cls.from_pretrained(where, device, store, **options)
                found.profile(person)  # refused by name when it is another base model's
                return found
        raise FileNotFoundError(f"profile {person!r} belongs to base model {meta['base']}, which is not where it was "
                                f"({record.get('where') or meta.get('base_path')}); name it (a file or models:/ URI)")

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def labels(self) -> list[str]:
        """What the model predicts: the nine classes (listener) or the speech LM's label words (speaker)."""
        return list(self.base.labels)

    @property
    def digest(self) -> str:
        return self.base.digest

    def read(self, clips: list, sample_rate: int | None = None, names: list | None = None) -> list[torch.Tensor]:
        """Decode clips to 16 kHz waveforms within the limits; an error names the clip (`names`, else its path
        or its place in the list)."""
        cut = getattr(self.base, "max_seconds", None)
        return [read_clip(clip, sample_rate, self.limits, cut, name=name) for clip, name in zip(clips, names or clip_names(clips))]

    def enroll(self, clips: list, labels: list, person: str | None = None, sample_rate: int | None = None,
               overwrite: bool = False, names: list | None = None) -> Profile:
        """A person's profile from their clips and labels (listener: class names, a str joined by ';' or a
        list, per clip; speaker: one label word or class name per clip, read in this order). With `person`,
        saved in the store (over a profile of another kind or base model only with `overwrite`)."""
        if person is not None:
            check_id(person)
        if len(clips) != len(labels):
            raise ValueError(f"{len(clips)} clips but {len(labels)} labels")
        if not clips:
            raise ValueError("no enrollment clips")
        if self.max_clips is not None and len(clips) > self.max_clips:
            raise ValueError(f"{len(clips)} enrollment clips; at most {self.max_clips}")
        names = names or clip_names(clips)
        if self.kind == "speaker":
            words = []
            for name, label in zip(names, labels):
                word = speaker.label_word(str(label), self.labels)
                if word is None:
                    raise ValueError(f"{name}: label {label!r} is not one of {', '.join(self.labels)}")
                words.append(word)
            speaker.check_pairs(self.base, len(clips))  # before decoding any
            waveforms = self.read(clips, sample_rate, names)
            with self._computing:
                tensors, meta = speaker.enroll(self.base, waveforms, words)
        else:
            targets = np.stack([listener.label_targets(l if isinstance(l, str) else ";".join(l), str(name))
                                for name, l in zip(names, labels)])
            waveforms = self.read(clips, sample_rate, names)
            with self._computing:
                tensors, meta = listener.enroll(self.base, waveforms, targets)
        meta = {**meta, "base_source": self.source}
        if person is not None:
            self.store.save(person, tensors, meta, overwrite=overwrite)
            self.store.remember_base(self.digest, self.kind, self.source)
            meta["person"] = person
        return Profile(person, tensors, meta)

    def profile(self, person: str) -> Profile:
        """A stored profile, refused by name when it was enrolled on another model or kind."""
        tensors, meta = self.store.load(person)
        if meta.get("base") != self.digest or meta.get("kind") != self.kind:
            raise ProfileError(f"profile {person!r} is a {meta.get('kind')} profile of base model {meta.get('base')}, "
                               f"not of this {self.kind} model {self.digest}")
        return Profile(person, tensors, meta)

    def probabilities(self, waveforms: list[torch.Tensor], profile: "Profile | str | None" = None) -> np.ndarray:
        """[N, labels] probabilities of decoded waveforms (`read`)."""
        if isinstance(profile, str):
            profile = self.profile(profile)
        with self._computing:
            if self.kind == "speaker":
                return speaker.probabilities(self.base, waveforms, profile and profile.tensors, profile and profile.meta)
            return listener.probabilities(self.base, waveforms, profile and profile.tensors)

    def records(self, probs: np.ndarray, top_k: int | None = None) -> list[dict]:
        """The one output shape, per clip: `scores` sorted (top_k of them; None: all) and, for a listener model,
        `labels` (every class above 1/C)."""
        found = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:top_k or None]
            record = {"scores": [{"label": self.labels[i], "score": float(p[i])} for i in order]}
            if self.kind == "listener":
                record["labels"] = [c for c, v in zip(self.labels, p) if v > 1 / len(self.labels)]
            found.append(record)
        return found

    def classify(self, audio, profile=None, top_k: int | None = None, sample_rate: int | None = None):
        """`records` of one clip (a record) or a list of clips (a list of them)."""
        batch = isinstance(audio, list)
        clips = audio if batch else [audio]
        found = self.records(self.probabilities(self.read(clips, sample_rate), profile), top_k)
        return found if batch else found[0]

    def predict(self, audio, profile=None, top_k: int | None = None, sample_rate: int | None = None):
        """[{"label", "score"}] sorted by score, for one clip; for a list of clips, one such list each."""
        found = self.classify(audio, profile, top_k, sample_rate)
        return [r["scores"] for r in found] if isinstance(found, list) else found["scores"]


__all__ = ["AudioError", "AudioLimits", "Personalizer", "Profile", "load_base"]
