"""`distmeta serve` under load on loopback, beside the Python API and `mlflow models serve`: throughput, latency
cold and warm, profile loads, enrollment time.

    .venv/bin/python benchmarks/bench_serve.py [--requests 300] [--profiles 3] [--seconds 120]
                                               [--max-profiles 8] [--replicas 2] [--model PATH] [--out runs/bench_serve]

Without --model it meta-trains a small Meta-PerSER model on the tiny upstream (a few seconds; the
network's size, not its training, sets the cost of a request). Then, on a local Ray with the Serve
application bound to 127.0.0.1:
- enrollment: K=32 labelled clips, in process (`profiles.listener.enroll`, the model already loaded) and
  over HTTP (`POST /enroll` with a tar, what a client waits for);
- cold requests: the first `POST /predict` of each profile (the replica loads it from the store);
- warm load: `--requests` predictions of one 3 s clip (stopped after `--seconds`), with as many client threads
  as replicas and then twice as many, profiles in turn; throughput, p50 / p95 / max latency as the client sees it;
- the same clip through the Python API in this process (`Personalizer.predict`, the model loaded) and through
  `mlflow models serve` of the same model registered as a pyfunc (a temporary tracking store), one client.
Goals on a 2-core machine with the tiny upstream: warm p95 under 100 ms at concurrency = replicas, K=32
enrollment under 5 s.
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
from distmeta.profiles.personalizer import Personalizer
from distmeta.report import figure, save_figure, save_table



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


def timed(call, n: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def mlflow_serve_latency(path: Path, audio: bytes, work: Path, n: int = 50) -> dict:
    """Register the model as a pyfunc in a temporary tracking store, start `mlflow models serve` on loopback,
    and time `n` warm requests of the clip (base64 in the JSON body, as MLflow's REST API takes bytes)."""
    import base64
    import os
    import subprocess
    import sys

    from distmeta import tracking
    from distmeta.profiles.mlflow_model import log_model

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    with tracking.run("bench-serve", "pyfunc", {}):
        version = log_model([path, path.with_suffix(".json")], "bench-listener")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/bench-listener/{version}",
                               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        body = {"dataframe_split": {"columns": ["audio"], "data": [[base64.b64encode(audio).decode()]]}}
        return percentiles(timed(lambda: requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).raise_for_status(), n))
    finally:
        server.terminate()
        server.wait(30)


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"n": len(ms), "p50 ms": np.percentile(ms, 50), "p95 ms": np.percentile(ms, 95), "max ms": ms.max()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop the warm phase after this long")
    parser.add_argument("--max-profiles", type=int, default=8, help="--max-profiles-per-replica of the server")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas, one CPU each (each computes one request at a time)")
    parser.add_argument("--model", help="a meta-trained model (default: a small one trained here)")
    parser.add_argument("--out", default="runs/bench_serve")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from distmeta.profiles.serve import ServeArgs, start
    from distmeta.profiles.uploads import enrollment_archive

    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    path, corpus, task = clips_and_model(work, args.model)
    support, _ = task.sample(32, 0, seed=0)
    clips = [(corpus.utterances.loc[task.utterances[i], "path"], ";".join(c for c, v in zip(CLASSES, task.targets[i]) if v > 0.5))
             for i in support]
    audio = three_second_clip(clips[0][0], work)
    rows = {}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        url = start(ServeArgs(model=str(path), store=str(work / "store"), max_profiles=args.max_profiles,
                              replicas=args.replicas), host="127.0.0.1", port=port)
        people = [f"person{i}" for i in range(args.profiles)]
        archive, times = enrollment_archive(clips), []
        for person in people:
            started = time.perf_counter()
            answer = requests.post(f"{url}/profiles/{person}/enroll", data=archive, timeout=300)
            times.append(time.perf_counter() - started)
            answer.raise_for_status()
        rows["enroll K=32, POST /profiles/ID/enroll"] = percentiles(times)

        def ask(person: str) -> float:
            started = time.perf_counter()
            answer = requests.post(f"{url}/profiles/{person}/predict" if person else f"{url}/predict", data=audio, timeout=60)
            answer.raise_for_status()
            return time.perf_counter() - started

        rows["predict 3 s, cold (first per profile)"] = percentiles([ask(p) for p in people])
        rows["predict 3 s, unpersonalized"] = percentiles([ask("") for _ in range(10)])
        order = [people[i % len(people)] for i in range(args.requests)]
        for concurrency in (args.replicas, 2 * args.replicas):
            deadline = time.perf_counter() + args.seconds / 2
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                warm = list(pool.map(lambda p: ask(p) if time.perf_counter() < deadline else None, order))
            wall = time.perf_counter() - started
            warm = [w for w in warm if w is not None]
            rows[f"predict 3 s, Serve app, warm, concurrency {concurrency}"] = {**percentiles(warm), "req/s": len(warm) / wall}
            if concurrency == args.replicas:
                plotted = warm
        health = requests.get(f"{url}/health", timeout=60).json()
    finally:
        serve.shutdown()
        ray.shutdown()

    # then, with Ray down, the Python API in this process and `mlflow models serve`, each alone on the machine
    try:  # the Python API in process, the model loaded (what a replica does for POST /enroll and /predict)
        api = Personalizer.from_pretrained(path, store=work / "store")
        api.enroll([c for c, _ in clips[:8]], [lab for _, lab in clips[:8]])  # warm-up: first-call allocations
        started = time.perf_counter()
        api.enroll([c for c, _ in clips], [lab for _, lab in clips], person="api")
        rows["enroll K=32, Python API"] = {"n": 1, "p50 ms": 1000 * (time.perf_counter() - started)}
        rows["predict 3 s, Python API (warm)"] = percentiles(timed(lambda: api.predict(audio, profile="api"), 50))
        rows["predict 3 s, mlflow models serve (warm)"] = mlflow_serve_latency(path, audio, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the corpus, model and store made for this run

    table = pd.DataFrame(rows).T
    table.index.name = f"{args.profiles} profiles, {args.replicas} replica(s), tiny upstream, loopback"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(save_table(table, out, "serve", "distmeta serve on this machine", ".1f").read_text())
    print(f"profile loads per profile on the replica: {health['loads']}")
    fig, ax = figure(figsize=(6, 4))
    ax.hist(1000 * np.asarray(plotted), bins=40)
    ax.set_xlabel("latency of POST /predict, 3 s clip (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"Serve app, warm, concurrency {args.replicas}, {args.profiles} profiles")
    print(f"plot: {save_figure(fig, out / 'latency.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
