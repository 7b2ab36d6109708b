"""A randomly initialised WavLM Base in s3prl's `wavlm_local` checkpoint format: the real upstream's size and
shape for timings and memory, with nothing downloaded.

    .venv/bin/python benchmarks/wavlm_base_checkpoint.py [OUT.pt]   # default: $DISTMETA_CACHE/upstreams/

Then `upstream.name=wavlm_local upstream.path=OUT.pt` in any job, or `bench_gpu.py --checkpoint OUT.pt`.
The configuration is WavLM Base's (Chen et al. 2022; microsoft/unilm's WavLM-Base config: 12 layers of 768,
gated relative position bias, GroupNorm feature encoder), except `encoder_layerdrop` 0 (Base trains with
0.05): a layer skipped at random would make every timing a draw. ~94.7M parameters, ~380 MB.
"""

import sys
from pathlib import Path

import torch

from distmeta.data.synthetic import default_cache_dir
from distmeta.io import atomic_path
from distmeta.models.s3prl_compat import import_s3prl_hub

WAVLM_BASE = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "feature_grad_mult": 0.1,
    "normalize": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
}


def wavlm_base_checkpoint(path: Path | None = None, seed: int = 0) -> Path:
    """Write (once) and return the checkpoint: {"cfg": WAVLM_BASE, "model": a random state dict}."""
    path = Path(path) if path else default_cache_dir() / "upstreams" / f"wavlm_base_random_seed{seed}.pt"
    if path.is_file():
        return path
    import_s3prl_hub()
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    torch.manual_seed(seed)
    model = WavLM(WavLMConfig(WAVLM_BASE))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"cfg": dict(WAVLM_BASE), "model": model.state_dict()}, tmp)
    return path


if __name__ == "__main__":
    print(wavlm_base_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
