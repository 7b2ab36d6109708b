"""Speech upstreams through s3prl's own loading code, plus a tiny one built locally.

`UpstreamConfig.name` is any s3prl hub entry: a remote model (`wavlm_base`,
`hubert`, `wav2vec2`, ... downloaded by s3prl only because the user named it),
a feature extractor (`fbank`), or a local-checkpoint loader (`wavlm_local`,
`hubert_local`, `wav2vec2_local`, with `path` the checkpoint). `tiny` and
`tiny_pretrained` are a 2-layer WavLM in s3prl's checkpoint format ({"cfg":
..., "model": state_dict}) in the cache folder (`models/tiny_wavlm.py`; built by
`training/tiny_wavlm.py`, which the jobs run first), loaded with
`s3prl.hub.wavlm_local`; nothing is downloaded, and constructing an `Upstream`
never builds or trains anything. `tiny` (random
weights) is what tests run on, `tiny_pretrained` (pretrained once on synthetic
audio of other speakers) what the listener jobs run on by default. `speech_encoder`
is the ICL paper's encoder shape (`models/speech_encoder.py`, s3prl's upstream
interface), loaded from `path`, the checkpoint the speaker job pretrains.

s3prl's wav2vec 2.0 / HuBERT / WavLM wrappers never train the convolutional
feature encoder (they set `feature_grad_mult = 0`: it runs under no_grad), so
its outputs are a fixed function of the audio. `conv_features` computes them
once per utterance and `forward(..., conv=...)` starts from them: the same
hidden states, ~2.5x cheaper for every scope that trains the rest
(`features.ConvFeatureBank`; the usual wav2vec 2.0 fine-tuning practice).
"""

import hashlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from distmeta.data.synthetic import default_cache_dir
from distmeta.io import atomic_path
from distmeta.models.s3prl_compat import import_s3prl_hub
from distmeta.models.speech_encoder import SpeechEncoder
from distmeta.models.tiny_wavlm import checkpoint, checkpoint_path


@dataclass
class UpstreamConfig:
    name: str = "tiny"  # "tiny", "tiny_pretrained", or any s3prl hub name (wavlm_base, hubert, fbank, wavlm_local, ...)
    path: str = ""  # checkpoint for *_local names
    seed: int = 0  # initialisation of the tiny upstream (and its pretraining audio)
    pretrain_epochs: int = 12  # tiny_pretrained: epochs of its self-supervised pretraining (training/tiny_wavlm.py)
    pretrain_utterances: int = 2000  # tiny_pretrained: synthetic utterances it is pretrained on


def build_name(config: UpstreamConfig) -> str:
    """For the locally built tiny upstreams, their checkpoint's file name, which names the recipe and the
    generator version that built it ("" for other names): part of every trained model's cache key beside
    the config, so models trained on an older `tiny_pretrained` are retrained, not reused."""
    return checkpoint_path(config).name if config.name in ("tiny", "tiny_pretrained") else ""


def portable(config: UpstreamConfig) -> bytes | None:
    """On the driver: the checkpoint file the upstream is built from, as bytes to ship to other nodes
    (nodes share no disk), or None when there is none (s3prl downloads, feature extractors). A tiny
    upstream's must have been built (training.tiny_wavlm.ready)."""
    if config.name in ("tiny", "tiny_pretrained"):
        path = checkpoint(config)
    else:
        path = Path(config.path) if config.name.endswith(("_local", "_custom")) else None
    return path.read_bytes() if path is not None else None


def landed(config: UpstreamConfig, checkpoint: bytes | None) -> UpstreamConfig:
    """On a worker or actor: `config` for building the upstream from the driver's `checkpoint` bytes,
    written into this node's cache first unless the same file is already there."""
    if checkpoint is None:
        return config
    if config.name in ("tiny", "tiny_pretrained"):
        path = checkpoint_path(config)
    else:
        path = default_cache_dir() / "upstreams" / f"shipped-{hashlib.sha256(checkpoint).hexdigest()[:16]}.pt"
        config = replace(config, path=str(path))
    if not path.is_file() or path.read_bytes() != checkpoint:  # a tiny one built here may differ in its last bits
        with atomic_path(path) as tmp:
            tmp.write_bytes(checkpoint)
    return config


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Upstream(nn.Module):
    """Wraps an s3prl upstream: padded waveforms [B, T] + lengths -> hidden states [L, B, F, D] + frame lengths."""

    def __init__(self, config: UpstreamConfig):
        super().__init__()
        hub = import_s3prl_hub()
        name = config.name
        if name in ("tiny", "tiny_pretrained"):
            self.model = hub.wavlm_local(str(checkpoint(config)))
        elif name == "speech_encoder":
            if not config.path:
                raise FileNotFoundError("upstream 'speech_encoder' needs upstream.path: a checkpoint that "
                                        "jobs/metaicl_train.py pretrains (speaker/encoder.py), or leave it empty there")
            self.model = SpeechEncoder.load(config.path)
        elif name.endswith("_local") or name.endswith("_custom"):
            if not config.path or not Path(config.path).is_file():
                raise FileNotFoundError(f"upstream {name!r} needs upstream.path to be a checkpoint file, got {config.path!r}")
            self.model = getattr(hub, name)(config.path)
        elif hasattr(hub, name):
            self.model = getattr(hub, name)()
        else:
            options = sorted(n for n in dir(hub) if not n.startswith("_"))
            raise ValueError(f"unknown upstream {name!r}; s3prl hub offers e.g. {options[:12]} ... ({len(options)} in all)")
        self.name, self.config = name, config
        self.downsample = int(self.model.get_downsample_rates("hidden_states"))
        with torch.no_grad():
            hidden = self.model([torch.zeros(16000)])["hidden_states"]
        self.num_layers, self.dim = len(hidden), hidden[0].shape[-1]
        self._pending_conv = None
        inner = getattr(self.model, "model", None)
        extractor = getattr(inner, "feature_extractor", None)
        self.conv_cacheable = extractor is not None and getattr(inner, "feature_grad_mult", 1.0) == 0.0
        if self.conv_cacheable:
            compute = extractor.forward
            self._compute_conv = compute  # a plain attribute, not a second registration of the module
            # The wrapper calls the extractor under no_grad; when conv features are handed in, return them instead.
            extractor.forward = lambda source: compute(source) if self._pending_conv is None else self._pending_conv

    def frame_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames the upstream produces for each utterance on its own.

        Wav2vec2-style models: the convolution arithmetic of their feature extractor
        (floor((n - kernel) / stride) + 1 per layer); others: n // downsample rate.
        """
        extractor = getattr(getattr(self.model, "model", None), "feature_extractor", None)
        convs = [m for m in extractor.modules() if isinstance(m, nn.Conv1d)] if extractor is not None else []
        if not convs:
            return torch.div(lengths, self.downsample, rounding_mode="floor")
        frames = lengths.clone()
        for conv in convs:
            frames = torch.div(frames - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
        return frames

    def frozen_names(self) -> set[str]:
        """Names (as `named_parameters` gives them) of the parameters no scope trains: the conv feature encoder
        when it runs frozen (under no_grad). Left trainable, they get zero meta-gradients, and an optimizer's
        weight decay would still move them away from the conv features cached for them."""
        if not self.conv_cacheable:
            return set()
        return {f"model.model.feature_extractor.{name}" for name, _ in self.model.model.feature_extractor.named_parameters()}

    def conv_digest(self) -> str:
        """Identifies the frozen conv encoder's weights: banks of its outputs serve only models that share it."""
        return _weights_digest(self.model.model.feature_extractor)

    def digest(self) -> str:
        """Identifies all the upstream's weights: pooled features (`features.Bank.pooled`) serve only models that share them."""
        return _weights_digest(self)

    @property
    def device(self) -> torch.device:
        """Where its weights are (an upstream of none, e.g. `fbank`: where its buffers are, or the CPU)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def conv_features(self, wav: torch.Tensor) -> torch.Tensor:
        """The frozen convolutional feature encoder's output for one utterance, [C, frames]."""
        if not self.conv_cacheable:
            raise ValueError(f"upstream {self.name!r} has no frozen convolutional feature encoder to cache")
        with torch.no_grad():
            return self._compute_conv(wav[None].to(self.device))[0]

    def forward(self, wavs: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                conv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of padded waveforms [B, T] (lengths in samples), or of their cached conv
        features `conv` [B, C, frames] (zero-padded; `wavs` unused): both give the same result.
        Inputs follow the upstream to its device."""
        lengths = lengths.to(self.device)
        if conv is None:
            wavs = wavs.to(self.device)
            hidden = self.model([w[:n] for w, n in zip(wavs, lengths)])["hidden_states"]
        else:
            # The wrapper derives the padding mask from waveform lengths (a frame is padding when all of its
            # share of the samples are), so it gets silent stand-ins; its extractor returns `conv` instead
            # of reading them. A stand-in of `downsample` samples per conv frame of its utterance makes that
            # mask exactly the frames past the utterance's own. (Stand-ins as long as the audio would let
            # the padded batch's next frame, computed over padding, into every shorter utterance's attention
            # and position convolution: its features would depend on what it is batched with.)
            frames = torch.clamp(self.frame_counts(lengths), min=1)
            conv = conv[:, :, :int(frames.max())].to(self.device)
            self._pending_conv = conv
            try:
                hidden = self.model([conv.new_zeros(int(n) * self.downsample) for n in frames])["hidden_states"]
            finally:
                self._pending_conv = None
        hidden = torch.stack(hidden)  # [L, B, F, D]
        return hidden, torch.clamp(self.frame_counts(lengths), 1, hidden.shape[2])
