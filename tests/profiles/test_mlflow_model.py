"""Registered models that MLflow's own tools load: `mlflow.pyfunc.load_model` and `mlflow models serve` answer
like `distmeta predict`, with a signature, an input example, metrics, tags, and aliases resolved."""

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from distmeta import cli


def clips(small_corpus, episode, n=3) -> list[str]:
    return [small_corpus.utterances.loc[u, "path"] for u in episode.query[:n]]


def test_pyfunc_load_model_predicts_like_distmeta_predict(registered, trained, small_corpus, capsys, monkeypatch):
    import mlflow

    version, uri = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    assert version == 1
    files = clips(small_corpus, trained[3])
    model = mlflow.pyfunc.load_model("models:/distmeta-listener/1")
    answer = model.predict(pd.DataFrame({"audio": [Path(f).read_bytes() for f in files]}), params={"top_k": 3})
    capsys.readouterr()
    assert cli.main(["predict", "--model", "models:/distmeta-listener@champion", *files, "--format", "jsonl", "--top-k", "3"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [[s["label"] for s in a["scores"]] for a in answer] == [[s["label"] for s in e["scores"]] for e in expected]
    assert np.allclose([[s["score"] for s in a["scores"]] for a in answer], [[s["score"] for s in e["scores"]] for e in expected], atol=1e-6)
    assert [a["labels"] for a in answer] == [e["labels"] for e in expected]

    # what the registry holds about the version: a signature with top_k, an input example, metrics, tags
    info = mlflow.models.get_model_info("models:/distmeta-listener/1")
    assert info.signature.inputs.input_names() == ["audio"] and info.signature.params.to_dict()[0]["name"] == "top_k"
    assert info.saved_input_example_info is not None and info.flavors["python_function"]["loader_module"] == "distmeta.profiles.mlflow_model"
    logged = mlflow.get_logged_model(info.model_id)
    assert {m.key: m.value for m in logged.metrics} == {"unseen.maF1": 0.5}
    assert logged.tags["kind"] == "listener" and logged.tags["scenario"] == "unseen"
    assert not list(Path(mlflow.artifacts.download_artifacts("models:/distmeta-listener/1")).rglob("*.pkl"))  # nothing pickled


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_distmeta_predict(registered, trained, small_corpus, tmp_path):
    import mlflow

    version, uri = registered
    files = clips(small_corpus, trained[3], 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import os

    # as from an activated .venv: mlflow starts the scoring server with the uvicorn beside it on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/distmeta-listener/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.time() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        body = {"dataframe_split": {"columns": ["audio"], "data": [[base64.b64encode(Path(f).read_bytes()).decode()] for f in files]},
                "params": {"top_k": 2}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        mlflow.set_tracking_uri(uri)
        expected = mlflow.pyfunc.load_model("models:/distmeta-listener/1").predict(
            pd.DataFrame({"audio": [Path(f).read_bytes() for f in files]}), params={"top_k": 2})
        served = answer.json()["predictions"]
        assert [[s["label"] for s in a["scores"]] for a in served] == [[s["label"] for s in e["scores"]] for e in expected]
        assert np.allclose([[s["score"] for s in a["scores"]] for a in served], [[s["score"] for s in e["scores"]] for e in expected], atol=1e-6)
    finally:
        server.terminate()
        server.wait(30)
