"""Distributed (Ray task actors) vs serial meta-training at equal work, and steps/s against the number of actors.

    .venv/bin/python benchmarks/bench_distributed.py [--scope head|entire] [--steps 20] [--utterances 600]

Same split, same seeds, same outer steps: the serial trainer computes the
training annotators' meta-gradients in process (together, on pooled features);
the distributed one sends each annotator's meta-gradient to its own Ray actor,
or (the job's default) to one of 2 actors that each compute theirs together. Reported per outer step: wall time, the
mean compute time inside one actor, and the rest (serialisation, object
store, scheduling, the driver's AdamW step). Ratios are from one run on one
machine; on a 2-core laptop the actors share the cores, so there is no
speed-up to expect, only the overhead to measure.
"""

import argparse
import tempfile
import time

import numpy as np
import ray
import torch

from distmeta.data import make_synthetic_corpus, rotation
from distmeta.meta.actors import ActorConfig, ActorPool
from distmeta.listener.metatrain import ListenerReplica
from distmeta.meta.learner import MetaConfig, MetaLearner, SerialGradients, train
from distmeta.listener.metatrain import build_meta_model, make_bank
from distmeta.models import UpstreamConfig


def timed_training(model, config, gradients, n_tasks, bank, val_task):
    learner = MetaLearner(model.clone(), config)
    started = time.perf_counter()
    train(learner, gradients, n_tasks, bank, val_task, log=None)
    return (time.perf_counter() - started) / config.outer_steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scope", default="head", choices=["head", "entire"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--shots", type=int, default=32)
    args = parser.parse_args()

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    corpus = make_synthetic_corpus(tempfile.mkdtemp(), seed=0, n_utterances=args.utterances, progress=False)
    split = rotation(corpus, "unseen")[0]
    config = MetaConfig(ini=False, scope=args.scope, outer_steps=args.steps, shots=args.shots, val_every=10 ** 9,
                        val_seeds=1, test_steps=1, val_queries=8)
    model = build_meta_model(UpstreamConfig(), None, config)
    tasks, val_task = split.train_tasks(corpus), split.val_task(corpus)
    pool_ids = sorted({u for t in tasks for u in t.utterances} | set(val_task.utterances))
    bank = make_bank(model, corpus, pool_ids, config, 6.0)
    print(f"scope {args.scope}, K={args.shots}, {config.inner_steps} inner steps, {args.steps} outer steps, "
          f"{torch.get_num_threads()} torch threads in the driver, {int(ray.cluster_resources()['CPU'])} CPUs")

    serial = timed_training(model, config, SerialGradients(bank, tasks), len(tasks), bank, val_task)
    pool = ActorPool(ActorConfig(), log=None)
    started = time.perf_counter()
    pool.setup(ListenerReplica(UpstreamConfig()), model, config, tasks, bank)
    setup = time.perf_counter() - started
    distributed = timed_training(model, config, pool, len(tasks), bank, val_task)
    compute = np.mean([m["seconds"] for m in pool.last_metrics.values()])
    print(f"\n{len(tasks)} tasks per outer step; actor start + setup {setup:.1f} s (once per pool / per split)")
    print("| trainer | s per outer step | outer steps/s | ratio to serial |")
    print("|---|---|---|---|")
    print(f"| serial | {serial:.3f} | {1 / serial:.2f} | 1.00 |")
    print(f"| distributed, {len(tasks)} actors | {distributed:.3f} | {1 / distributed:.2f} | {distributed / serial:.2f} |")
    few = ActorPool(ActorConfig(max_actors=2), log=None)  # the job's default: each actor computes its tasks together
    few.setup(ListenerReplica(UpstreamConfig()), model, config, tasks, bank)
    two = timed_training(model, config, few, len(tasks), bank, val_task)
    few.shutdown()
    print(f"| distributed, 2 actors holding {len(tasks)} tasks | {two:.3f} | {1 / two:.2f} | {two / serial:.2f} |")
    print(f"\nper actor per step: {compute * 1000:.1f} ms computing its meta-gradient "
          f"(serial: {serial / len(tasks) * 1000:.1f} ms per task)")

    print("\n| actors (= tasks per step) | outer steps/s | meta-gradients/s |")
    print("|---|---|---|")
    for n in sorted({1, 2, 4, len(tasks)}):
        pool.setup(ListenerReplica(UpstreamConfig()), model, config, tasks[:n], bank)
        per_step = timed_training(model, config, pool, n, bank, val_task)
        print(f"| {n} | {1 / per_step:.2f} | {n / per_step:.1f} |")
    pool.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
