"""`distmeta serve` under load on loopback: throughput, latency cold and warm, profile loads, enrollment time.

    .venv/bin/python benchmarks/bench_serve.py [--requests 300] [--concurrency 2] [--profiles 3] [--seconds 120]
                                               [--max-profiles 8] [--replicas 2] [--model PATH] [--out runs/bench_serve]

Without --model it meta-trains a small Meta-PerSER model on the tiny upstream (a few seconds; the
network's size, not its training, sets the cost of a request). Then, on a local Ray with the Serve
application bound to 127.0.0.1:
- enrollment: K=32 labelled clips, in process (`profiles.listener.enroll`, the model already loaded) and
  over HTTP (`POST /enroll` with a tar, what a client waits for);
- cold requests: the first `POST /predict` of each profile (the replica loads it from the store);
- warm load: `--requests` predictions of one 3 s clip (stopped after `--seconds`), `--concurrency` client
  threads, profiles in turn; throughput, p50 / p95 / max latency as the client sees it.
Goals on a 2-core machine with the tiny upstream: warm p95 under 100 ms, K=32 enrollment under 5 s.
Writes `serve.md` / `.csv` (the table) and `latency.png` (latency distribution) under --out. One run, one machine.
"""

import argparse
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests
import soundfile as sf

from distmeta.data import make_synthetic_corpus, rotation
from distmeta.labels import CLASSES
from distmeta.meta.learner import MetaConfig
from distmeta.listener.metatrain import meta_train_cached
from distmeta.models import UpstreamConfig
from distmeta.profiles.listener import ListenerBase, enroll
from distmeta.report import figure, save_figure, save_table

HEADER = "serve_multiplexed_model_id"


def clips_and_model(folder: Path, model: str | None):
    """The synthetic corpus's first unseen split's test task (its clips are the requests), and `model`, else a
    meta-trained model on the tiny upstream made from that split."""
    corpus = make_synthetic_corpus(folder / "corpus", seed=0, n_utterances=600, progress=False)
    split = rotation(corpus, "unseen")[0]
    if model:
        return Path(model), corpus, split.test_task(corpus)
    config = MetaConfig(outer_steps=2, shots=8, val_every=2, val_seeds=1, val_queries=16, test_steps=50, ini=False)
    path = folder / "meta.safetensors"
    meta_train_cached(path, corpus, split, UpstreamConfig(), None, config, {}, log=None)
    return path, corpus, split.test_task(corpus)


def three_second_clip(path: str, folder: Path) -> bytes:
    wav, rate = sf.read(path, dtype="float32")
    clip = np.resize(wav, 3 * rate)  # the utterance repeated to 3 s
    out = folder / "clip3s.wav"
    sf.write(out, clip, rate)
    return out.read_bytes()


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"n": len(ms), "p50 ms": np.percentile(ms, 50), "p95 ms": np.percentile(ms, 95), "max ms": ms.max()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop the warm phase after this long")
    parser.add_argument("--max-profiles", type=int, default=8, help="--max-profiles-per-replica of the server")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas, one CPU each (each computes one request at a time)")
    parser.add_argument("--model", help="a meta-trained model (default: a small one trained here)")
    parser.add_argument("--out", default="runs/bench_serve")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from distmeta.profiles.serve import enrollment_archive, start

    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    path, corpus, task = clips_and_model(work, args.model)
    support, _ = task.sample(32, 0, seed=0)
    clips = [(corpus.utterances.loc[task.utterances[i], "path"], ";".join(c for c, v in zip(CLASSES, task.targets[i]) if v > 0.5))
             for i in support]
    labelled = [(path_, task.targets[i]) for (path_, _), i in zip(clips, support)]  # as read_labelled gives them
    rows = {}

    # enrollment in process, the model loaded (what a replica does for POST /enroll)
    base = ListenerBase.load(path)
    enroll(base, labelled[:8])  # warm-up: first-call allocations
    started = time.perf_counter()
    enroll(base, labelled)
    rows["enroll K=32, in process"] = {"n": 1, "p50 ms": 1000 * (time.perf_counter() - started)}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        url = start(str(path), work / "store", host="127.0.0.1", port=port, max_profiles=args.max_profiles,
                    replicas=args.replicas)
        people = [f"person{i}" for i in range(args.profiles)]
        archive, times = enrollment_archive(clips), []
        for person in people:
            started = time.perf_counter()
            answer = requests.post(f"{url}/enroll", params={"person": person}, data=archive, timeout=300)
            times.append(time.perf_counter() - started)
            answer.raise_for_status()
        rows["enroll K=32, POST /enroll"] = percentiles(times)

        audio = three_second_clip(clips[0][0], work)

        def ask(person: str) -> float:
            started = time.perf_counter()
            answer = requests.post(f"{url}/predict", data=audio, headers={HEADER: person}, timeout=60)
            answer.raise_for_status()
            return time.perf_counter() - started

        rows["predict 3 s, cold (first per profile)"] = percentiles([ask(p) for p in people])
        rows["predict 3 s, unpersonalized"] = percentiles([ask("") for _ in range(10)])
        deadline = time.perf_counter() + args.seconds
        order = [people[i % len(people)] for i in range(args.requests)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            warm = list(pool.map(lambda p: ask(p) if time.perf_counter() < deadline else None, order))
        wall = time.perf_counter() - started
        warm = [w for w in warm if w is not None]
        rows[f"predict 3 s, warm, concurrency {args.concurrency}"] = {**percentiles(warm), "req/s": len(warm) / wall}
        health = requests.get(f"{url}/health", timeout=60).json()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the corpus, model and store made for this run

    table = pd.DataFrame(rows).T
    table.index.name = f"{args.profiles} profiles, {args.replicas} replica(s), tiny upstream, loopback"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(save_table(table, out, "serve", "distmeta serve on this machine", ".1f").read_text())
    print(f"profile loads per profile on the replica: {health['loads']}")
    fig, ax = figure(figsize=(6, 4))
    ax.hist(1000 * np.asarray(warm), bins=40)
    ax.set_xlabel("latency of POST /predict, 3 s clip (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"warm, concurrency {args.concurrency}, {args.profiles} profiles")
    print(f"plot: {save_figure(fig, out / 'latency.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
