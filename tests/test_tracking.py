"""The MLflow store: one absolute place whatever folder a job runs from (real MLflow, SQLite)."""

from distmeta import tracking


def test_runs_from_two_folders_land_in_one_store_with_artifacts_beside_it(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DISTMETA_HOME", str(tmp_path / "home"))
    for folder in ("a", "b"):  # as `ray job submit` runs each job in a temporary copy of the working dir
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        (tmp_path / folder / "note.txt").write_text(folder)
        with tracking.run("exp", f"run-{folder}", {"x": {"y": 1}}) as logger:
            logger.log_artifact("note.txt")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=["exp"])
    assert sorted(runs["tags.mlflow.runName"]) == ["run-a", "run-b"] and set(runs["params.x.y"]) == {"1"}
    assert sorted(p.name for p in (tmp_path / "home" / "mlartifacts").rglob("note.txt")) == ["note.txt", "note.txt"]
    assert not list((tmp_path / "a").glob("ml*")) and not list((tmp_path / "b").glob("ml*"))


def test_a_server_uri_is_used_as_given(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_a_registered_model_is_the_one_of_the_store_it_is_read_from(tmp_path, monkeypatch):
    """`models:/distmeta-listener/1` of two tracking stores are two models; the download cache must tell them apart."""
    for store, content in (("a", b"first"), ("b", b"second")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / store / 'mlflow.db'}")
        (tmp_path / f"{store}.safetensors").write_bytes(content)
        with tracking.run("registry-test", store, {}):
            assert tracking.register_model([tmp_path / f"{store}.safetensors"], "distmeta-listener") == 1
        folder = tracking.registered_files("models:/distmeta-listener/1")
        assert (folder / f"{store}.safetensors").read_bytes() == content
