"""Model inputs for sets of utterances: waveforms loaded once, or hidden states computed once.

A bank maps utterance ids to tensors and collates any list of ids into the
input dict `SERModel` takes. `ConvFeatureBank` holds the outputs of the
upstream's frozen convolutional feature encoder, so scopes that train the
transformer (SSL-E, Entire-Few, Entire-All, scope `entire`) skip the most
expensive part of every step; `input_bank` picks it whenever the upstream has
one. `PooledBank` serves frozen-upstream scopes: the upstream runs once per
utterance (no gradients), adaptation runs on the cache; `pooled_for` takes them
from a job-wide bank, which keeps them per upstream, so the trainings and
adapters that share an upstream (a split's SSL-E) run it once.
"""

import threading
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence

from distmeta.data.audio import load_audio
from distmeta.data.corpus import Corpus
from distmeta.io import atomic_path
from distmeta.models.ser import SERHead


class Bank:
    """utterance id -> tensor(s); `batch(ids)` collates the model's input dict."""

    items: dict

    def __len__(self) -> int:
        return len(self.items)

    def length(self, u) -> int:
        """How long `u`'s input is (what a batch pads to the longest of); 1 where nothing is padded."""
        return 1

    def subset(self, ids) -> "Bank":
        """The same kind of bank holding only `ids` (what one Ray task actor needs)."""
        part = object.__new__(type(self))
        part.items = {u: self.items[u] for u in dict.fromkeys(ids)}
        return part

    def pooled(self, upstream) -> "PooledBank":
        """The pooled features of every utterance here under `upstream` (frozen), computed once per upstream
        weights and kept for the last `POOLED_KEPT` upstreams (a job's bank: see `pooled_for`)."""
        with _POOLED_LOCK:  # trainings side by side (jobs/meta_train.py) ask for a split's features at once
            kept = self.__dict__.setdefault("_pooled", OrderedDict())  # the constructors differ; a subset keeps none
            key = upstream.digest()
            if key not in kept:
                kept[key] = PooledBank(upstream, self)
                while len(kept) > POOLED_KEPT:
                    kept.popitem(last=False)
            kept.move_to_end(key)
            return kept[key]


class AudioBank(Bank):
    def __init__(self, corpus: Corpus, utterances, max_seconds: float | None = None):
        paths = corpus.utterances["path"]
        self.items = {u: load_audio(paths[u], max_seconds=max_seconds) for u in dict.fromkeys(utterances)}

    @classmethod
    def of_waveforms(cls, waveforms: dict) -> "AudioBank":
        """A bank of waveforms already loaded (id -> [T]), e.g. files outside any corpus."""
        bank = object.__new__(cls)
        bank.items = dict(waveforms)
        return bank

    def length(self, u) -> int:
        return len(self.items[u])

    def batch(self, ids) -> dict:
        wavs = [self.items[u] for u in ids]
        return {"wavs": pad_sequence(wavs, batch_first=True), "lengths": torch.tensor([len(w) for w in wavs])}


class ConvFeatureBank(Bank):
    """Per-utterance outputs [C, F'] of the upstream's frozen convolutional feature encoder (and the
    utterance's length in samples): the upstream starts from them and computes the same hidden states."""

    def __init__(self, upstream, audio: AudioBank):
        self.items = {u: (upstream.conv_features(wav).cpu(), len(wav)) for u, wav in audio.items.items()}  # banks live in host memory
        self.encoder = upstream.conv_digest()

    def subset(self, ids) -> "ConvFeatureBank":
        part = super().subset(ids)
        part.encoder = self.encoder
        return part

    def length(self, u) -> int:
        return self.items[u][1]

    def batch(self, ids) -> dict:
        convs = [self.items[u][0].T for u in ids]
        return {"conv": pad_sequence(convs, batch_first=True).transpose(1, 2),
                "lengths": torch.tensor([self.items[u][1] for u in ids])}


def input_bank(upstream, audio: AudioBank) -> Bank:
    """What a model whose upstream trains (or runs) reads: cached conv features when the upstream has a
    frozen conv encoder (every s3prl wav2vec 2.0 / HuBERT / WavLM), else the audio itself."""
    return ConvFeatureBank(upstream, audio) if upstream.conv_cacheable else audio


def inputs_for(upstream, utterances, shared: Bank | None, corpus=None, max_seconds=None) -> Bank:
    """The input bank of `utterances` for a model with this upstream: a part of `shared` (one bank
    computed once for a whole job; refused if its conv encoder is not this upstream's), else a new one."""
    if shared is None:
        return input_bank(upstream, AudioBank(corpus, utterances, max_seconds))
    if isinstance(shared, ConvFeatureBank) and (not upstream.conv_cacheable or shared.encoder != upstream.conv_digest()):
        raise ValueError("the shared input bank was computed with another conv encoder than this model's upstream")
    missing = [u for u in dict.fromkeys(utterances) if u not in shared.items]
    if missing:
        raise KeyError(f"the shared input bank lacks {len(missing)} utterances, e.g. {missing[:3]}")
    return shared.subset(utterances)


# A split's SSL-E (its Meta-PerSER trainings, Table 2 variants and meta-test adapters share that upstream)
# and the untrained upstream (Linear, Multi, Table 2's "none"): each runs once per split, not once per use.
POOLED_KEPT = 2
_POOLED_LOCK = threading.Lock()


def pooled_for(upstream, utterances, shared: Bank | None, corpus=None, max_seconds=None) -> "PooledBank":
    """Pooled features of `utterances` under a frozen `upstream`: a part of `shared`'s (a job-wide input bank,
    whose pooled features are computed once per upstream, `Bank.pooled`), else computed for them alone.
    The same features either way (up to float rounding: equal-length utterances share a batch)."""
    inputs = inputs_for(upstream, utterances, shared, corpus, max_seconds)  # checks the conv encoder and the ids
    return PooledBank(upstream, inputs) if shared is None else shared.pooled(upstream).subset(utterances)


class PooledBank(Bank):
    """Per-utterance, per-layer means over valid frames [L, D] of a frozen upstream.

    For scopes that leave the upstream fixed this is all the SER head needs
    (see models/ser.py), so the upstream runs once per utterance, without gradients.
    An utterance must get the same features in a meta-test pool as alone in a served
    request: from conv features padding changes nothing (models/upstream.py), so any
    lengths share a batch (longest first); from waveforms a padded batch would move a
    shorter utterance's features, so only utterances of equal length do.
    """

    def __init__(self, upstream, audio: "AudioBank | ConvFeatureBank", batch_size: int = 32):
        self.items = {}
        ids = sorted(audio.items, key=lambda u: -audio.length(u))
        any_length = isinstance(audio, ConvFeatureBank)
        chunks = []
        for u in ids:
            if chunks and len(chunks[-1]) < batch_size and (any_length or audio.length(chunks[-1][0]) == audio.length(u)):
                chunks[-1].append(u)
            else:
                chunks.append([u])
        was_training = upstream.training
        upstream.eval()
        with torch.no_grad():
            for chunk in chunks:
                hidden, frames = upstream(**audio.batch(chunk))
                pooled = SERHead.pool(hidden, frames).cpu()  # [L, B, D]; banks live in host memory
                for i, u in enumerate(chunk):
                    self.items[u] = pooled[:, i].clone()
        upstream.train(was_training)

    def batch(self, ids) -> dict:
        return {"pooled": torch.stack([self.items[u] for u in ids], dim=1)}


class FrameBank(Bank):
    """Per-utterance frames [F, D] of one layer of a frozen upstream (the speech LM's encoder output).

    Computed once, without gradients; `batch(ids)` pads them into {"frames": [U, F, D], "frame_mask": [U, F]}.
    `save`/`load` keep it as safetensors so a restarted or remote worker need not rerun the upstream.
    """

    def __init__(self, upstream=None, audio: AudioBank | None = None, layer: int = -1):
        self.items = {}
        if upstream is None:
            return
        was_training = upstream.training
        upstream.eval()
        with torch.no_grad():
            # One utterance at a time: in a padded batch, s3prl's WavLM gives a shorter utterance
            # different frames (its convolutional position embedding and attention see the padding).
            for u, wav in audio.items.items():
                hidden, frames = upstream(wav[None], torch.tensor([len(wav)]))
                self.items[u] = hidden[layer, 0, :int(frames[0])].cpu().clone()
        upstream.train(was_training)

    @property
    def dim(self) -> int:
        return next(iter(self.items.values())).shape[-1]

    def length(self, u) -> int:
        return len(self.items[u])

    def batch(self, ids) -> dict:
        frames = [self.items[u] for u in ids]
        lengths = torch.tensor([len(f) for f in frames])
        return {"frames": pad_sequence(frames, batch_first=True),
                "frame_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None]}

    def save(self, path) -> None:
        with atomic_path(path) as tmp:
            save_file({u: f.contiguous() for u, f in self.items.items()}, str(tmp))

    @classmethod
    def load(cls, path) -> "FrameBank":
        bank = cls()
        bank.items = load_file(str(path))
        return bank
