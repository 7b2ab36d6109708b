"""The tiny upstream the embedded default runs on: a 2-layer WavLM in s3prl's checkpoint format.

    path = checkpoint(UpstreamConfig(name="tiny_pretrained"))   # the file s3prl's wavlm_local loads

`tiny` is randomly initialised (fast; what the tests use); `tiny_pretrained` is the same model pretrained
on synthetic audio of other speakers with PASE-like self-supervised workers, the stand-in for what WavLM
Base+ brings to SER. Both are built by the recipe in `distmeta/training/tiny_wavlm.py` (which the jobs run
before they construct a model) into `$DISTMETA_CACHE/upstreams`, under a file name that is the cache key:
everything that shapes the weights. The default pretrained build ships in `models/weights/` under the same
name. This module only says where a checkpoint is; it never builds one.
"""

from pathlib import Path

import torch

from distmeta.data.synthetic.cache import VOICE_VERSION, default_cache_dir
from distmeta.io import settings_digest
from distmeta.models.s3prl_compat import import_s3prl_hub

TINY_WAVLM = {
    # layer_norm normalises each frame on its own; "default" (GroupNorm over time, as in the base
    # models) makes an utterance's features depend on how much padding its batch has.
    "extractor_mode": "layer_norm",
    "encoder_layers": 2,
    "encoder_embed_dim": 64,
    "encoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4,
    "conv_feature_layers": "[(32,10,5)] + [(32,8,4)] + [(32,4,4)] + [(32,2,2)] * 2",  # 320x downsampling, as in base models
    # With a bias, the first convolution's output is signal + a fixed offset before its LayerNorm, so
    # loudness survives the normalisation (without one it is divided out; loudness tells anger from
    # frustration and sadness from neutral).
    "conv_bias": True,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "normalize": False,
}
PRETRAINING_VERSION = 2  # 2: the frame-level pitch worker; bump when the pretraining recipe changes, so old checkpoints are not reused
SHIPPED = Path(__file__).parent / "weights"  # pretrained builds shipped with the package, named by their cache key


def wavlm(seed: int):
    """The tiny WavLM, randomly initialised from `seed` (what the recipe saves or pretrains)."""
    import_s3prl_hub()
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    torch.manual_seed(seed)
    return WavLM(WavLMConfig(TINY_WAVLM))


def tiny_checkpoint_path(seed: int = 0) -> Path:
    return default_cache_dir() / "upstreams" / f"tiny_wavlm_{settings_digest(TINY_WAVLM)}_seed{seed}.pt"


def pretrained_tiny_path(seed: int = 0, epochs: int = 12, utterances: int = 2000) -> Path:
    key = {"wavlm": TINY_WAVLM, "seed": seed, "epochs": epochs, "utterances": utterances,
           "recipe": PRETRAINING_VERSION, "generator": VOICE_VERSION}  # the key's old name: built checkpoints keep theirs
    return default_cache_dir() / "upstreams" / f"tiny_wavlm_pretrained_{settings_digest(key)}.pt"


def checkpoint_path(config) -> Path:
    """Where the checkpoint of a `tiny` or `tiny_pretrained` upstream config lives in this machine's cache."""
    if config.name == "tiny":
        return tiny_checkpoint_path(config.seed)
    return pretrained_tiny_path(config.seed, config.pretrain_epochs, config.pretrain_utterances)


def checkpoint(config) -> Path:
    """The checkpoint to load for a tiny upstream config: the cache's, else the shipped build of the same key.
    Missing, it says how to build it: nothing here builds."""
    path = checkpoint_path(config)
    if path.is_file():
        return path
    if (SHIPPED / path.name).is_file():
        return SHIPPED / path.name
    raise FileNotFoundError(f"upstream {config.name!r} (seed {config.seed}) has no checkpoint at {path}: the jobs build it "
                            f"before they construct a model; in your own code call "
                            f"distmeta.training.tiny_wavlm.ready(config) first")
