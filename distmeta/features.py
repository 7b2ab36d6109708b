"""Model inputs for sets of utterances: waveforms loaded once, or hidden states computed once.

A bank maps utterance ids to tensors and collates any list of ids into the
input dict `SERModel` takes. `HiddenBank` serves frozen-upstream scopes: the
upstream runs once per utterance (no gradients), adaptation runs on the cache.
"""

import torch
from torch.nn.utils.rnn import pad_sequence

from distmeta.data.audio import load_audio
from distmeta.data.corpus import Corpus


class AudioBank:
    def __init__(self, corpus: Corpus, utterances, max_seconds: float | None = None):
        paths = corpus.utterances["path"]
        self.items = {u: load_audio(paths[u], max_seconds=max_seconds) for u in dict.fromkeys(utterances)}

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, ids) -> dict:
        wavs = [self.items[u] for u in ids]
        return {"wavs": pad_sequence(wavs, batch_first=True), "lengths": torch.tensor([len(w) for w in wavs])}


class HiddenBank:
    """Per-utterance hidden states [L, F, D] of a frozen upstream."""

    def __init__(self, upstream, audio: AudioBank, batch_size: int = 32, dtype=torch.float32):
        self.items = {}
        ids = list(audio.items)
        # Longest first keeps padding (wasted compute) small within each batch.
        ids.sort(key=lambda u: -len(audio.items[u]))
        was_training = upstream.training
        upstream.eval()
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                hidden, frames = upstream(**audio.batch(chunk))
                for i, u in enumerate(chunk):
                    self.items[u] = hidden[:, i, : frames[i]].to(dtype).clone()
        upstream.train(was_training)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, ids) -> dict:
        hidden = [self.items[u].transpose(0, 1) for u in ids]  # [F, L, D] for padding over F
        padded = pad_sequence(hidden, batch_first=True).permute(2, 0, 1, 3)  # [L, B, F, D]
        return {"hidden": padded.float(), "frames": torch.tensor([h.shape[0] for h in hidden])}
