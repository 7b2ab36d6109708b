"""Inner-loop speed: steps per second by scope and derivative order; vmap over seeds vs a Python loop.

    .venv/bin/python benchmarks/bench_inner_loop.py [--shots 32] [--steps 5] [--repeats 3] [--seeds 10]

One meta-gradient = `steps` inner steps + the outer loss + backward, on K
utterances of 2.5 s (tiny upstream). Scope `entire` runs the upstream every step,
from the waveform or from its frozen conv encoder's cached outputs ("entire+conv",
what the library does); `head` starts from cached pooled features. Ratios are from one run on one machine.
"""

import argparse
import time

import torch

from distmeta.meta.maml import adapt, batched_adapt, meta_gradients
from distmeta.meta.maml import batch_balanced_loss as loss_fn
from distmeta.models import SERModel, Upstream, UpstreamConfig, set_scope
from distmeta.models.ser import SERHead
from distmeta.training.tiny_wavlm import ready as build_upstream


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_upstream(UpstreamConfig())
    model = SERModel(Upstream(UpstreamConfig())).to(device)
    wavs = torch.randn(args.shots, 40_000, device=device) * 0.1
    lengths = torch.full((args.shots,), 40_000, device=device)
    targets = torch.nn.functional.one_hot(torch.arange(args.shots) % 9, 9).float().to(device)
    with torch.no_grad():
        pooled = SERHead.pool(*model.upstream(wavs, lengths))
        conv = torch.stack([model.upstream.conv_features(w) for w in wavs])
    print(f"device {device}, K={args.shots}, {args.steps} inner steps per meta-gradient")
    print("| scope | order | meta-gradients/s | inner steps/s |")
    print("|---|---|---|---|")
    rows = {}
    for label, inputs in (("entire", {"wavs": wavs, "lengths": lengths}), ("entire+conv", {"conv": conv, "lengths": lengths}),
                          ("head", {"pooled": pooled})):
        scope = label.split("+")[0]
        set_scope(model, scope)
        lrs = {n: torch.full((args.steps,), 1e-3, device=device) for n, p in model.named_parameters() if p.requires_grad}
        for second in (False, True):
            seconds = timed(lambda: meta_gradients(model, loss_fn, (inputs, targets), lrs=lrs, steps=args.steps,
                                                   second_order=second), args.repeats)
            rows[(label, second)] = seconds
            print(f"| {label} | {'second' if second else 'first'} | {1 / seconds:.2f} | {args.steps / seconds:.1f} |")
    print(f"second/first order time ratio: entire {rows[('entire', True)] / rows[('entire', False)]:.2f}, "
          f"head {rows[('head', True)] / rows[('head', False)]:.2f}; entire/head (first order) "
          f"{rows[('entire', False)] / rows[('head', False)]:.0f}x; entire/entire+conv (first order) "
          f"{rows[('entire', False)] / rows[('entire+conv', False)]:.1f}x, (second) {rows[('entire', True)] / rows[('entire+conv', True)]:.1f}x")

    # Meta-test adaptation of many seeds at once (scope head): vmap over seeds vs a Python loop.
    set_scope(model, "head")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    rates = {n: torch.full((1,), 1e-3, device=device) for n in params}
    seeds_inputs = pooled[None].expand(args.seeds, *pooled.shape) + 0.01 * torch.randn(args.seeds, *pooled.shape, device=device)
    test_steps = 50

    def loop():
        return [adapt(model, loss_fn, ({"pooled": seeds_inputs[s]}, targets), lrs=rates, steps=test_steps,
                      params=dict(params))[-1] for s in range(args.seeds)]

    def batched():  # what validation does: every episode adapts in one vectorised pass
        return batched_adapt(model, loss_fn, [({"pooled": seeds_inputs[s]}, targets) for s in range(args.seeds)],
                             lrs=rates, steps=test_steps)

    looped, together = loop(), batched()
    for s in range(args.seeds):  # the two must agree before their speeds mean anything
        assert all(torch.allclose(looped[s][n].detach(), together[s][n], atol=1e-5) for n in params), "vmap != loop"
    t_loop, t_vmap = timed(loop, args.repeats), timed(batched, args.repeats)
    print(f"\nadapting {args.seeds} seeds x {test_steps} steps (scope head): loop {t_loop * 1000:.0f} ms, "
          f"vmap {t_vmap * 1000:.0f} ms, speed-up {t_loop / t_vmap:.1f}x")


if __name__ == "__main__":
    main()
