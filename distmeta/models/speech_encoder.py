"""The ICL paper's speech encoder in CPU size: 80 log-mel bands -> two convolution + pooling
subsampling layers (4x: 40 ms frames) -> transformer blocks.

    wav [T] -> log-mel [T/160, 80] -> (Conv1d k3 -> GELU -> MaxPool 2) x 2 -> [T/640, dim]
            -> + sinusoidal positions -> transformer blocks (pre-norm) -> LayerNorm

It speaks s3prl's upstream interface (`forward(list of wavs) -> {"hidden_states": [...]}`,
`get_downsample_rates`), so `models.upstream.Upstream` wraps it like any s3prl upstream
(`upstream.name: speech_encoder`, `upstream.path`: its checkpoint). Hidden state 0 is the subsampled
convolution output, state i the i-th block's. `speaker.encoder` pretrains it (a Ray Train job); it is
saved as safetensors plus a JSON sidecar whose "encoder" holds this config, and loaded without pickle.
"""

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torchaudio
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence

HOP = 160  # 10 ms at 16 kHz
SUBSAMPLING = 4  # two poolings of 2
HEAD = "head."  # checkpoint keys of the pretraining head (speaker/encoder.py: the Scratch baseline), not the encoder's


@dataclass
class SpeechEncoderConfig:
    n_mels: int = 80
    dim: int = 128
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1


@lru_cache
def _mel_transform(n_mels: int) -> nn.Module:
    # center=True: frame i is centred on sample 160 i
    return torchaudio.transforms.MelSpectrogram(16000, n_fft=400, win_length=400, hop_length=HOP, n_mels=n_mels)


def log_mel(wav: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[T] samples at 16 kHz -> [T // 160, n_mels] log-mel frames (25 ms windows, 10 ms hop)."""
    with torch.no_grad():
        mel = _mel_transform(n_mels)(wav)[:, :len(wav) // HOP]
    return torch.log(mel + 1e-6).T


class SpeechEncoder(nn.Module):
    def __init__(self, config: SpeechEncoderConfig):
        super().__init__()
        self.config = config
        self.subsample = nn.ModuleList([nn.Conv1d(config.n_mels, config.dim, 3, padding=1),
                                        nn.Conv1d(config.dim, config.dim, 3, padding=1)])
        self.conv_norm = nn.LayerNorm(config.dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.dim, config.heads, config.ffn_dim, dropout=config.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.dim)

    @staticmethod
    def get_downsample_rates(key: str = "hidden_states") -> int:
        return HOP * SUBSAMPLING

    def positions(self, frames: int) -> torch.Tensor:
        position = torch.arange(frames, dtype=torch.float32)[:, None]
        rate = torch.exp(torch.arange(0, self.config.dim, 2, dtype=torch.float32) * (-math.log(10000.0) / self.config.dim))
        table = torch.zeros(frames, self.config.dim)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
        return table

    def encode_mel(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Padded log-mel [B, M, n_mels] with lengths in mel frames -> hidden states (each [B, M // 4, dim]) and
        frame lengths. Padding frames are zeroed before the convolutions and masked in attention."""
        x, lengths = mel.transpose(1, 2), mel_lengths
        for conv in self.subsample:  # zeroing the padding first keeps a batched utterance's frames its own
            x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None])[:, None, :]
            x = nn.functional.max_pool1d(nn.functional.gelu(conv(x)), 2)
            lengths = torch.div(lengths, 2, rounding_mode="floor")
        lengths = torch.clamp(lengths, min=1)
        mask = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
        x = self.conv_norm(x.transpose(1, 2))
        x = x + self.positions(x.shape[1]).to(x)
        hidden = [x]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~mask)
            hidden.append(x)
        hidden[-1] = self.final_norm(x)
        return hidden, lengths

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        """s3prl's upstream call: a list of waveforms -> {"hidden_states": [state 0, block 1, ...]}."""
        mels = [log_mel(w, self.config.n_mels) for w in wavs]
        hidden, _ = self.encode_mel(pad_sequence(mels, batch_first=True), torch.tensor([len(m) for m in mels]))
        return {"hidden_states": hidden}

    @classmethod
    def load(cls, path) -> "SpeechEncoder":
        """A pretrained encoder from its safetensors file and JSON sidecar (`speaker.encoder` writes both)."""
        path = Path(path)
        sidecar = path.with_suffix(".json")
        if not path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(f"speech encoder {path}: needs the .safetensors file and its .json sidecar")
        encoder = cls(SpeechEncoderConfig(**json.loads(sidecar.read_text())["encoder"]))
        encoder.load_state_dict({k: v for k, v in load_file(str(path)).items() if not k.startswith(HEAD)})
        return encoder.eval()
