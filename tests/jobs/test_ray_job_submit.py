"""How users launch: `ray start --head` + `ray job submit -- python jobs/meta_train.py`, with token auth."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (`ray stop` would stop every Ray instance of the user)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=20)
    for proc in alive:
        proc.kill()


def kill_a_train_worker_mid_pretraining(models: Path, total: int, outcome: dict, stop: threading.Event) -> None:
    """SIGKILL the Ray Train worker once some but not all pretrained models are on disk, i.e. while it is
    training one; record how many were done and whether the kill landed in that window."""
    while not stop.is_set():
        done = len(list(models.glob("*/*/*.safetensors")))
        workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        if 0 < done < total and workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            outcome.update(pid=workers[0].pid, done_before=done, done_after=len(list(models.glob("*/*/*.safetensors"))),
                           time=time.time())
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_submitted_job_survives_kills_at_every_moment_with_token_authentication(tmp_path):
    """The chaos test: a smoke job submitted to a local cluster with token authentication, once undisturbed and
    once with a task actor SIGKILLed at four moments drawn from a seed (during setup, mid-step, during validation,
    between splits; `distributed.Chaos`) and the Ray Train worker SIGKILLed mid-pretraining. The second job
    succeeds with the same results.csv, and every kill is on record at its moment."""
    bin_dir = Path(sys.executable).parent  # a job's `python` is the one on the PATH of `ray start`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    start = [str(bin_dir / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)

    def submit(name: str, chaos: str = "") -> list[str]:
        variables = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DISTMETA_CHAOS": chaos}
        return [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                "--runtime-env-json", json.dumps({"env_vars": variables}), "--",
                "python", "jobs/meta_train.py", "--preset", "smoke", "--out", str(tmp_path / name),
                f"models_dir={tmp_path / name / 'models'}", f"data.path={tmp_path / 'corpus'}",
                "protocol.scenarios=[unseen]", "protocol.table2=[]", "experiment=submitted"]

    try:
        refused = subprocess.run(submit("refused"), env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True,
                                 text=True, timeout=180)
        assert refused.returncode != 0 and not (tmp_path / "refused").exists()
        calm = subprocess.run(submit("calm"), env=env, capture_output=True, text=True, timeout=1200)
        assert calm.returncode == 0, calm.stdout[-3000:] + calm.stderr[-3000:]
        assert "succeeded" in calm.stdout and "Meta-PerSER" in calm.stdout  # the job's log, with Table 1, streamed back

        record, train_kill, stop = tmp_path / "chaos.jsonl", {}, threading.Event()
        models = tmp_path / "chaos" / "models"
        total = len(list((tmp_path / "calm" / "models").glob("*/*/*.safetensors")))  # pretrained + meta-trained
        pretrained = sum(1 for p in (tmp_path / "calm" / "models").glob("*/*/*.safetensors") if not p.name.startswith("meta"))
        killer = threading.Thread(target=kill_a_train_worker_mid_pretraining, args=(models, pretrained, train_kill, stop))
        killer.start()
        try:
            chaos = subprocess.run(submit("chaos", f"11:{record}"), env=env, capture_output=True, text=True, timeout=1200)
        finally:
            stop.set()
            killer.join()
        assert chaos.returncode == 0, chaos.stdout[-3000:] + chaos.stderr[-3000:]
        assert len(list(models.glob("*/*/*.safetensors"))) == total
    finally:
        stop_cluster(temp_dir)
    # every kill landed at its moment: the Train worker while models were still to train, each actor kill on
    # record with the death the pool noticed and repaired
    assert train_kill and 0 < train_kill["done_before"] < pretrained and train_kill["done_after"] < pretrained, train_kill
    kills = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(k["moment"] for k in kills) == sorted(["setup", "step", "validation", "between splits"]), kills
    for kill in kills:
        assert f"task actor of annotator {kill['annotator']!r} died" in chaos.stdout, kill
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "chaos" / "results.csv"), pd.read_csv(tmp_path / "calm" / "results.csv"))
