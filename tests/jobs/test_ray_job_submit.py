"""How users launch: `ray start --head` + `ray job submit -- python jobs/meta_train.py`, with token auth."""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
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


@pytest.mark.slow
def test_job_submit_to_a_local_cluster_with_token_authentication(tmp_path):
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
    try:
        out = tmp_path / "run"
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  "python", "jobs/meta_train.py", "--preset", "smoke", "--out", str(out), f"models_dir={tmp_path / 'models'}",
                  f"data.path={tmp_path / 'corpus'}", "protocol.scenarios=[unseen]", "protocol.table2=[]", "experiment=submitted"]
        refused = subprocess.run(submit, env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True,
                                 timeout=180)
        assert refused.returncode != 0 and not out.exists()
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1200)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout and "Meta-PerSER" in job.stdout  # the job's log, with Table 1, streamed back
        results = pd.read_csv(out / "results.csv")
        assert {"Meta-PerSER", "Entire-Few"} <= set(results["method"]) and set(results["scenario"]) == {"unseen"}
    finally:
        stop_cluster(temp_dir)
