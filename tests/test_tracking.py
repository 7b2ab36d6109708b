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


def _register(name: str, file) -> int:
    """A registered model of one file, as MLflow's API makes one (the jobs register pyfunc models)."""
    import mlflow

    model = mlflow.initialize_logged_model(name=name)
    mlflow.MlflowClient().log_model_artifact(model.model_id, str(file))
    mlflow.finalize_logged_model(model.model_id, "READY")
    return int(mlflow.register_model(f"models:/{model.model_id}", name).version)


def test_a_registered_model_is_the_one_of_the_store_it_is_read_from(tmp_path, monkeypatch):
    """`models:/distmeta-listener/1` of two tracking stores are two models; the download cache must tell them apart."""
    for store, content in (("a", b"first"), ("b", b"second")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / store / 'mlflow.db'}")
        (tmp_path / f"{store}.safetensors").write_bytes(content)
        with tracking.run("registry-test", store, {}):
            assert _register("distmeta-listener", tmp_path / f"{store}.safetensors") == 1
        folder = tracking.registered_files("models:/distmeta-listener/1")
        assert (folder / f"{store}.safetensors").read_bytes() == content


def test_an_alias_or_latest_is_resolved_to_its_version_before_the_cache(tmp_path, monkeypatch):
    """`@champion` moved to another version (or a new `latest`) is that version's files, not the first download's."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.run("alias-test", "run", {}):
        for content in (b"one", b"two"):
            (tmp_path / "m.safetensors").write_bytes(content)
            version = _register("distmeta-listener", tmp_path / "m.safetensors")
            MlflowClient().set_registered_model_alias("distmeta-listener", "champion", version)
            assert tracking.model_version("models:/distmeta-listener@champion") == ("distmeta-listener", str(version))
            for uri in ("models:/distmeta-listener@champion", "models:/distmeta-listener/latest"):
                assert (tracking.registered_files(uri) / "m.safetensors").read_bytes() == content


def test_experiments_open_in_the_model_training_view_and_runs_carry_a_description_and_tags(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.create_experiment("made-before")  # an experiment made by an older distmeta: marked on its next run
    for experiment in ("new", "made-before"):
        with tracking.run(experiment, "run", {}, "what this run is", {"path": "listener", "seed": 3}):
            pass
        found = mlflow.get_experiment_by_name(experiment)
        assert found.tags["mlflow.experimentKind"] == "custom_model_development"
        run = mlflow.search_runs(experiment_names=[experiment], output_format="list")[0]
        assert run.data.tags["mlflow.note.content"] == "what this run is"
        assert run.data.tags["path"] == "listener" and run.data.tags["seed"] == "3"


def test_tables_and_figures_saved_inside_a_run_are_logged_for_the_ui(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from distmeta.report import figure, save_figure, save_table

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = pd.DataFrame({"maF1": [30.5, 41.0]}, index=pd.Index(["SSL-E", "Meta-PerSER"], name="method"))
    save_table(table, tmp_path / "out", "outside")  # no run: files only
    with tracking.run("tables", "run", {}):
        save_table(table, tmp_path / "out", "table1")
        fig, ax = figure()
        ax.plot([1, 2])
        save_figure(fig, tmp_path / "out" / "shots.png")
        run_id = mlflow.active_run().info.run_id
    assert mlflow.load_table("tables/table1.json", run_ids=[run_id])[["method", "maF1"]].values.tolist() == \
        [["SSL-E", 30.5], ["Meta-PerSER", 41.0]]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "plots")}
    assert logged == {"plots/shots.png"} and (tmp_path / "out" / "outside.csv").is_file()
