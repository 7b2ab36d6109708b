"""GPU timings on a WavLM-Base-sized upstream, scope entire, K=32 clips of ~3 s: one line per figure.

    python benchmarks/bench_gpu.py [--checkpoint PT] [--precision fp32|tf32|bf16] [--shots 32] [--queries 128]
        [--seconds 3] [--test-steps 50] [--inner-steps 5] [--repeats 3]

- one listener's meta-test, the paper's (`--preset paper`: Meta-PerSER adapts the whole model with its
  learned rates, 50 SGD steps, then 128 queries) and Entire-Few's (50 AdamW steps), in seconds, from the
  library's own adapters (MetaPerSER, FineTune) on a conv-feature bank, as the protocol runs them;
- meta-gradients per second, first and second order (`MetaModel.meta_gradients`, 5 inner steps), and
  second order with `recompute_inner` (each inner step's graph rebuilt while differentiating back);
- the peak GPU memory of each;
- the share of the GPU's peak FLOP/s a meta-gradient reaches: FLOPs counted by torch's FlopCounterMode
  (matrix products, convolutions, attention; elementwise work is not counted) over the measured time,
  against the dense peak of the precision the matrix products ran in (H100/H200 SXM: float32 67, TF32 495,
  bf16 989 TFLOP/s).

The checkpoint is a random WavLM Base (benchmarks/wavlm_base_checkpoint.py): the weights' values do not
change the arithmetic. Audio is random too (seeded); targets are one label per clip, 9 classes. Float32 with
torch's defaults is `fp32` (matrix products in full float32); `tf32` lets the tensor cores round inputs to
TF32; `bf16` runs under autocast. Figures are from one run on one machine.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from wavlm_base_checkpoint import wavlm_base_checkpoint

from distmeta.features import AudioBank, ConvFeatureBank
from distmeta.listener.adapters import AdaptConfig, Episode, FineTune, MetaPerSER
from distmeta.meta.learner import MetaConfig
from distmeta.listener.metatrain import meta_model_of
from distmeta.models import SERModel, Upstream, UpstreamConfig, set_scope

PEAK_TFLOPS = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}  # H100 / H200 SXM, dense


def synced(fn):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measured(fn, repeats: int) -> tuple[float, float]:
    """(mean seconds over `repeats` after one warm-up, peak GiB allocated during them)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = [synced(fn)[1] for _ in range(repeats)]
    return float(np.mean(seconds)), torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--precision", choices=list(PEAK_TFLOPS), default="fp32")
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--test-steps", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    # Without CUDA it runs on the CPU (small sizes: a check that the script works, not a figure to report)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    checkpoint = wavlm_base_checkpoint(Path(args.checkpoint) if args.checkpoint else None)

    torch.manual_seed(0)
    model = set_scope(SERModel(Upstream(UpstreamConfig(name="wavlm_local", path=str(checkpoint)))), "entire").to(device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device: {name}; precision {args.precision}; WavLM-Base-sized upstream, {trained / 1e6:.1f}M trained parameters")

    rng = np.random.default_rng(0)
    samples = int(args.seconds * 16000)
    ids = [f"u{i}" for i in range(args.shots + args.queries)]
    # ~3 s: lengths spread +-10% around it, as real clips are
    audio = AudioBank.of_waveforms({u: torch.tensor(rng.normal(0, 0.1, int(samples * rng.uniform(0.9, 1.1))), dtype=torch.float32)
                                    for u in ids})
    bank, seconds = synced(lambda: ConvFeatureBank(model.upstream, audio))
    print(f"conv features of {len(ids)} clips (the bank a meta-test starts from): {seconds:.2f} s")
    support, query = ids[:args.shots], ids[args.shots:]
    labels = np.eye(9, dtype=np.float32)[np.arange(args.shots) % 9]
    episode = Episode(0, support, labels, query)

    meta_config = MetaConfig(scope="entire", inner_steps=args.inner_steps, inner_lr=1e-3, test_adapt="rates",
                             test_steps=args.test_steps)
    meta = meta_model_of(model, meta_config)
    for label, adapter in (
            (f"Meta-PerSER (learned rates, {args.test_steps} SGD steps)", MetaPerSER("Meta-PerSER", meta, bank, meta_config)),
            (f"Entire-Few ({args.test_steps} AdamW steps)", FineTune("Entire-Few", model, "entire", bank,
                                                                   AdaptConfig(steps=args.test_steps, lr=1e-4)))):
        with autocast:
            mean, peak = measured(lambda: adapter.predict(episode), max(1, args.repeats - 1))
        print(f"one listener's meta-test, {label} + {args.queries} queries: {mean:.2f} s")
        print(f"peak GPU memory, that meta-test: {peak:.1f} GiB")

    inputs = bank.batch(support)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    targets = torch.as_tensor(labels, device=device)
    for second_order, recompute in ((False, False), (True, False), (True, True)):
        order = ("second" if second_order else "first") + (" (recompute_inner)" if recompute else "")

        def step():
            with autocast:
                loss, grads = meta.meta_gradients((inputs, targets), steps=args.inner_steps, second_order=second_order,
                                                  recompute=recompute)
            return grads

        mean, peak = measured(step, args.repeats)
        print(f"meta-gradients per second, {order} order ({args.inner_steps} inner steps, K={args.shots}): {1 / mean:.2f}")
        print(f"peak GPU memory, a {order}-order meta-gradient: {peak:.1f} GiB")
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        achieved = flops / mean / 1e12
        share = f"{achieved / PEAK_TFLOPS[args.precision]:.1%} of the {args.precision} peak" if "H100" in name or "H200" in name else "peak unknown for this GPU"
        print(f"FLOP/s of a {order}-order meta-gradient: {flops / 1e12:.2f} TFLOP in {mean:.3f} s = {achieved:.1f} TFLOP/s, {share}")


if __name__ == "__main__":
    main()
