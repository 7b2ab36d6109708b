"""How users launch: `ray start` on two nodes + `ray job submit -- python jobs/...py`, with token auth."""

import json
import os
import secrets
import shutil
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
from sklearn.metrics import accuracy_score

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (`ray stop` would stop every Ray instance of the user): those whose
    command line names its temp dir, and their children (the agents retitle themselves "ray::DashboardAgent";
    left running, they keep the agent port and the next cluster on this machine has no job agent)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for proc in list(mine):
        try:
            mine += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    mine = list({proc.pid: proc for proc in mine}.values())
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=20)
    for proc in alive:
        proc.kill()


def start_two_node_cluster(env: dict, temp_dir: str, hidden: Path) -> str:
    """A head with no CPUs, where only the job drivers run, and a second node with two CPUs that cannot see
    `hidden` (the jobs' out, models_dir, corpus and cache): it runs in a mount namespace of its own with an
    empty tmpfs over that folder. Every Ray Train worker and task actor lands on it, as on a cluster whose
    nodes share no disk but Ray's storage. Returns the dashboard address jobs are submitted to."""
    bin_dir = Path(sys.executable).parent
    dashboard, port, head_agent, node_agent = (free_port() for _ in range(4))
    # each node's agent on a free port: at Ray's default one, any other Ray on this machine (the tests' own
    # local instance included) holds it, the head's agent cannot serve, and every submission answers
    # "No available agent"
    subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--dashboard-agent-listen-port={head_agent}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    # its own temp dir (under the head's, so stop_cluster finds it): its runtime-env agent must not share
    # (and clean up) the head's unpacked working directories, as two machines would not
    join = (f"mount -t tmpfs tmpfs {hidden} && exec {bin_dir / 'ray'} start --address=127.0.0.1:{port} --num-cpus=2 "
            f"--temp-dir={temp_dir}/node2 --dashboard-agent-listen-port={node_agent} --disable-usage-stats")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", join], env=env, check=True,
                   capture_output=True, timeout=180)
    return f"http://127.0.0.1:{dashboard}"


def run_submitted(command: list[str], env: dict, patience: float = 300.0) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting (it answers "No available
    agent" for a few seconds after `ray start`, and for minutes on a loaded 2-core machine)."""
    deadline = time.time() + patience
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        if "No available agent" not in done.stdout + done.stderr or time.time() > deadline:
            return done
        time.sleep(2)


def kill_a_train_worker_mid_pretraining(storage: Path, total: int, outcome: dict, stop: threading.Event) -> None:
    """SIGKILL the Ray Train worker once some but not all pretrained models are checkpointed in Ray's storage,
    i.e. while it is training one; record how many were done and whether the kill landed in that window."""
    def done() -> int:
        return len(list(storage.glob("pretrain-*/checkpoint_*/model.json")))

    since = time.time()  # a lingering worker of an earlier job must not be the one killed
    while not stop.is_set():
        finished = done()
        workers = [p for p in psutil.process_iter(["cmdline", "create_time"])
                   if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= since]
        if 0 < finished < total and workers:
            os.kill(workers[0].pid, signal.SIGKILL)
            outcome.update(pid=workers[0].pid, done_before=finished, done_after=done(), time=time.time())
            return
        time.sleep(0.05)


def ua_spk_reference(rows: pd.DataFrame) -> float:
    return sum(accuracy_score(g["label"], g["prediction"]) for _, g in rows.groupby("speaker")) / rows["speaker"].nunique()


def check_icl_outputs(out: Path, models: Path, tracking_uri: str) -> None:
    """The ICL job's results: every model and condition, Tables II-IV against per-speaker accuracies computed
    from results.csv with scikit-learn, the MLflow run's metrics, the saved speech LMs."""
    import mlflow

    results = pd.read_csv(out / "results.csv", keep_default_na=False)
    words = ["Neutral", "Surprise", "Sadness", "Joy", "Fear", "Disgust", "Anger"]
    assert set(results["label"]) == set(words) and set(results["prediction"]) <= set(words)
    assert set(results["model"]) == {"Scratch", "Pretrained", "Personalized_N", "Personalized_A", "0-shot", "1-shot_N",
                                     "Proposed", "Proposed (TO+LD_7)", "Proposed (Neutral_0:7)", "MAML",
                                     "Oracle-Speaker", "Oracle-Reader", "Ceiling-Speaker", "Ceiling-Reader"}
    per_condition = results.groupby(["model", "setting", "emotion", "k"]).size()
    assert (per_condition == per_condition.iloc[0]).all() and per_condition.iloc[0] == results["speaker"].nunique() * 7 * 3

    table2 = pd.read_csv(out / "table2.csv", keep_default_na=False)
    for _, row in table2.iterrows():
        rows = results[results["model"] == row["model"]]
        if row["model"] in ("Proposed", "MAML", "Oracle-Reader", "Ceiling-Reader"):
            k = int(row["ICL"].split("-")[0])
            rows = rows[(rows["k"] == k) & rows["setting"].isin(["", "TU+LD", "TO+LD"])]
            assert row["setting"] == {0: "-", 7: "TO+LD"}.get(k, "TU+LD")
        assert row["UA_spk"] == pytest.approx(ua_spk_reference(rows))
    assert [r for r in table2["ICL"] if r.endswith("-shot")] == ["1-shot"] + [f"{k}-shot" for k in range(8)] * 4
    room = table2[table2["model"] == "Oracle-Reader"]["UA_spk"]  # the ceiling rows' room, and each reader's share
    proposed = table2[table2["model"] == "Proposed"]["UA_spk"]
    assert float(table2[table2["model"] == "Proposed"]["share of room"].iloc[-1]) == pytest.approx(
        (proposed.iloc[-1] - proposed.iloc[0]) / (room.iloc[-1] - room.iloc[0]))
    # MAML (on the job's task actors) adapted on exactly the pairs the speech LM read: the same episodes
    maml, proposed = (results[(results["model"] == m) & results["setting"].isin(["TU+LD", "TO+LD"])] for m in ("MAML", "Proposed"))
    assert list(zip(maml["utterance"], maml["k"])) == list(zip(proposed["utterance"], proposed["k"]))
    table3 = pd.read_csv(out / "table3.csv", index_col=0)
    assert list(table3.index) == [f"{k}-shot" for k in range(1, 7)]
    assert {"TU+LD", "TU+LU", "TE+LD", "TE+LU", "TU+LO Anger", "TU+LO Neutral"} <= set(table3.columns)
    lo = results[(results["model"] == "Proposed") & (results["setting"] == "TU+LO") & (results["emotion"] == "angry")
                 & (results["k"] == 2)]
    assert table3.loc["2-shot", "TU+LO Anger"] == pytest.approx(ua_spk_reference(lo))
    table4 = pd.read_csv(out / "table4.csv", index_col=0)
    assert len(table4) == 6 and (out / "shots.png").stat().st_size > 0

    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.search_runs(experiment_names=["submitted"], filter_string="tags.mlflow.runName LIKE 'metaicl-%'").iloc[0]
    assert run["status"] == "FINISHED" and run["params.model.llm"] == "tiny_icl" and run["metrics.best_val_loss.TU_LU"] > 0
    assert run["metrics.UA_spk.Proposed.7_shot"] == pytest.approx(ua_spk_reference(
        results[(results["model"] == "Proposed") & (results["k"] == 7)]))
    assert run["metrics.UA_spk.Pretrained"] == pytest.approx(ua_spk_reference(results[results["model"] == "Pretrained"]))
    assert run["metrics.UA_spk.MAML.7_shot"] == pytest.approx(ua_spk_reference(results[(results["model"] == "MAML") & (results["k"] == 7)]))
    assert run["metrics.best_val_loss.MAML"] > 0
    registered = mlflow.MlflowClient().search_model_versions("name='distmeta-speaker'")
    assert len(registered) == 1 and registered[0].status == "READY"  # the TU+LU speech LM, for use
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts("models:/distmeta-speaker/1",
                                                                     dst_path=str(out / "registered"))).rglob("*")}
    assert sum(f.startswith("speech_encoder-") for f in files) == 2  # ... with the encoder it reads (+ sidecar)
    assert "MLmodel" in files and run["tags.path"] == "speaker"  # a pyfunc model; a tagged run
    profile = pd.read_csv(out / "timing.csv", index_col=0, keep_default_na=False)  # the time profile
    timing, beside = profile["seconds"], profile["beside the speech LMs"] == "yes"
    assert {"speech encoder", "MAML", "speech LM evaluation"} <= set(timing.index)
    assert timing["total"] >= timing[~beside].drop("total").sum() - 1  # phases beside the speech LMs overlap them
    sidecars = sorted(models.glob("speech_lm-*.json"))  # stage 1, TU+LU, TO+LD, Neutral, Neutral1
    assert len(sidecars) == 5 and all(json.loads(p.read_text())["best_step"] > 0 for p in sidecars)
    assert len(list(models.glob("speech_lm-*.safetensors"))) == 5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare for the second node's private mount")
def test_jobs_on_two_nodes_sharing_no_disk_succeed_and_survive_kills_at_every_moment(tmp_path):
    """How users launch, on a cluster whose nodes share only Ray's storage: `ray job submit` with token
    authentication to a head that runs the drivers and a second node that cannot see the head's files.

    - The ICL smoke job (two DDP workers) succeeds with every model, Tables II-IV checked against scikit-learn and
      its MLflow run (`check_icl_outputs`).
    - The listener smoke job runs once undisturbed, and once with a task actor SIGKILLed at four moments drawn
      from a seed (during setup, mid-step, during validation, between splits; `distributed.Chaos`) and the
      Ray Train worker SIGKILLed mid-pretraining. Both succeed with the same results.csv, and every kill is on
      record at its moment."""
    bin_dir = Path(sys.executable).parent  # a job's `python` is the one on the PATH of `ray start`
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths live under it
    storage = Path(tempfile.mkdtemp(prefix="raystorage", dir="/tmp"))  # what every node sees, as an NFS or S3 would be
    head_only = tmp_path / "head"
    head_only.mkdir()
    address = start_two_node_cluster(env, temp_dir, head_only)

    def submit(job: str, name: str, chaos: str = "", *overrides: str) -> list[str]:
        variables = {"MLFLOW_TRACKING_URI": f"sqlite:///{head_only / 'mlflow.db'}", "DISTMETA_CHAOS": chaos,
                     "DISTMETA_CACHE": str(head_only / "cache")}  # tiny upstreams are built on the head only
        return [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                "--runtime-env-json", json.dumps({"env_vars": variables}), "--",
                "python", f"jobs/{job}.py", "--preset", "smoke", "--out", str(head_only / name),
                f"models_dir={head_only / name / 'models'}", f"storage={storage / name}", "experiment=submitted", *overrides]

    def listener(name: str, chaos: str = "") -> list[str]:  # two splits, two SSL-E models: what the kills need
        return submit("meta_train", name, chaos, f"data.path={head_only / 'corpus'}", "protocol.scenarios=[unseen]",
                      "protocol.table2=[]", "protocol.sweep_shots=[]", "protocol.methods=[Entire-Zero,Entire-Few,Meta-PerSER]")

    try:
        speaker = run_submitted(submit("metaicl_train", "icl", "", f"data.path={head_only / 'speakers'}",
                                       "meta.num_workers=2", "meta.cpus_per_worker=1"), env)  # two DDP workers
        assert speaker.returncode == 0, speaker.stdout[-3000:] + speaker.stderr[-3000:]
        assert "Personalized_A" in speaker.stdout  # Table II, printed by the driver
        check_icl_outputs(head_only / "icl", head_only / "icl" / "models", f"sqlite:///{head_only / 'mlflow.db'}")

        refused = run_submitted(listener("refused"), {**env, "RAY_AUTH_TOKEN": "not-the-token"})  # the agent is up by now
        assert refused.returncode != 0 and not (head_only / "refused").exists()
        assert "401" in refused.stdout + refused.stderr or "auth" in (refused.stdout + refused.stderr).lower()
        calm = run_submitted(listener("calm"), env)
        assert calm.returncode == 0, calm.stdout[-3000:] + calm.stderr[-3000:]
        assert "succeeded" in calm.stdout and "Meta-PerSER" in calm.stdout  # the job's log, with Table 1, streamed back

        record, train_kill, stop = head_only / "chaos.jsonl", {}, threading.Event()
        models = head_only / "chaos" / "models"
        total = len(list((head_only / "calm" / "models").glob("*/*/*.safetensors")))  # pretrained + meta-trained
        pretrained = sum(1 for p in (head_only / "calm" / "models").glob("*/*/*.safetensors") if not p.name.startswith("meta"))
        killer = threading.Thread(target=kill_a_train_worker_mid_pretraining,
                                  args=(storage / "chaos", pretrained, train_kill, stop))
        killer.start()
        try:
            chaos = run_submitted(listener("chaos", f"11:{record}"), env)
        finally:
            stop.set()
            killer.join()
        assert chaos.returncode == 0, chaos.stdout[-3000:] + chaos.stderr[-3000:]
        assert len(list(models.glob("*/*/*.safetensors"))) == total
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(storage, ignore_errors=True)
    # every kill landed at its moment: the Train worker while models were still to train, each actor kill on
    # record with the death the pool noticed and repaired
    assert train_kill and 0 < train_kill["done_before"] < pretrained and train_kill["done_after"] < pretrained, train_kill
    kills = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(k["moment"] for k in kills) == sorted(["setup", "step", "validation", "between splits"]), kills
    for kill in kills:
        assert f"task actor of {kill['annotator']!r} died" in chaos.stdout, kill
    pd.testing.assert_frame_equal(pd.read_csv(head_only / "chaos" / "results.csv"), pd.read_csv(head_only / "calm" / "results.csv"))
