"""The main job end to end on its smoke preset: real Ray Train pretraining, Ray task actors, real MLflow."""

import shutil

import pandas as pd
import pytest

COLUMNS = ["method", "scenario", "upstream", "annotator", "seed", "shots", "maF1", "miF1", "UA"]


def test_resume_with_other_data_or_model_settings_is_refused_naming_each_key(load_job, tmp_path):
    from distmeta import config as cfg
    from distmeta.settings import MetaTrainConfig

    job = load_job("meta_train")
    cfg.save(MetaTrainConfig(out=str(tmp_path)), tmp_path / "config.yaml")  # as a run there wrote it
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(SystemExit) as refused:
        job.main(["--resume", str(tmp_path), "data.seed=1", "upstream.name=tiny", "protocol.seeds=1"])
    message = str(refused.value)
    assert "data.seed: 0 -> 1" in message and "upstream.name: 'tiny_pretrained' -> 'tiny'" in message
    assert "protocol" not in message  # the meta-test settings may change on resume
    assert (tmp_path / "config.yaml").read_text() == saved  # the run's own record is left as it was


@pytest.mark.slow
def test_smoke_run_tables_mlflow_and_determinism(load_job, listener_smoke, tmp_path, monkeypatch, capfd):
    import mlflow
    import ray

    ray.shutdown()  # the job starts its own local instance, as a user's would
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store goes under the test folder
    job = load_job("meta_train")
    models = listener_smoke["models"]
    args = ["--preset", "smoke", f"data.path={listener_smoke['corpus']}", f"models_dir={models}", "experiment=test"]
    saved_before = set(models.rglob("*.safetensors"))  # none unless another test ran the preset first
    pretrained_before = {p for p in saved_before if p.stem in ("ssl_e", "linear", "multi")}
    try:
        # the plan first, on the same corpus and cluster: it trains nothing
        assert job.main(args + ["--out", str(tmp_path / "estimate"), "--estimate"]) == 0
        assert "projected:" in capfd.readouterr().out and set(models.rglob("*.safetensors")) == saved_before
        assert job.main(args + ["--out", str(tmp_path / "a")]) == 0
        printed = "".join(capfd.readouterr())
        shutil.copy(tmp_path / "a" / "results.csv", tmp_path / "a" / "first_results.csv")  # the rerun must equal it
        # same config and folder, every model reused; registering every split's model this time
        assert job.main(["--resume", str(tmp_path / "a"), "register=all"]) == 0
    finally:
        ray.shutdown()
    # A log a person reads: Ray Train's workers print each progress line once; no State API failures (the
    # local instance has its dashboard); s3prl's config dumps and deprecation warnings are silenced.
    progress = [line for line in printed.splitlines() if "] pretraining " in line]
    assert len(progress) == 12 - len(pretrained_before) and len(set(progress)) == len(progress), progress
    assert "State API" not in printed and "WavLM Config" not in printed and "weight_norm" not in printed
    assert "Reporting training result" not in printed
    a = pd.read_csv(tmp_path / "a" / "first_results.csv")
    assert list(a.columns) == COLUMNS
    # 7 methods + 3 ceilings x 2 scenarios x 2 annotators x 1 seed at K=8, the 2 Table 2 variants
    # (unseen only), plus the sweep's K=2 for 4 methods
    assert len(a) == 10 * 2 * 2 + 2 * 2 + 4 * 2 * 2
    assert {"Entire-All", "Oracle-Listener", "Oracle-Aggregate"} <= set(a["method"])
    assert {"Meta-PerSER", "Meta[none]", "Meta[INI+CSMT+DA+LSLR]"} <= set(a["method"])
    # Table 2's last row is Meta-PerSER's own model: its episodes are scored once, the rows the same
    scores, keys = ["maF1", "miF1", "UA"], ["annotator", "seed", "shots"]
    last = a[a["method"] == "Meta[INI+CSMT+DA+LSLR]"].set_index(keys)[scores]
    own = a[(a["method"] == "Meta-PerSER") & (a["scenario"] == "unseen") & (a["shots"] == 8)].set_index(keys)[scores]
    pd.testing.assert_frame_equal(last.sort_index(), own.sort_index())
    timing = pd.read_csv(tmp_path / "a" / "timing.csv", index_col="method")["total"]
    assert timing["Meta[INI+CSMT+DA+LSLR]"] == 0 < timing["Meta-PerSER"]  # its copies cost nothing
    # The estimate against the run it planned: the episodes it counted are the run's (its copies aside), and
    # its meta-test compute (one episode of each method, measured, times their counts) is within a factor of
    # two of the seconds the run's episodes took. The phases' fixed start-up costs (Ray Train, actors,
    # MLflow) are not projected, so the smoke run's wall is not compared.
    plan = pd.read_csv(tmp_path / "estimate" / "estimate.csv", index_col=0)
    scored = a[a["method"] != "Meta[INI+CSMT+DA+LSLR]"]
    assert plan.loc["meta-test episodes", "units"] == len(scored)
    assert 0.5 <= plan.loc["meta-test episodes", "compute_s"] / timing.sum() <= 2.0
    assert plan.loc["meta-training: meta-gradients", "units"] == (2 * 2 + 2) * 4 * 9  # trainings x outer steps x tasks
    assert plan.loc["whole run", "peak_gib"] > 0.1
    assert a[["maF1", "miF1", "UA"]].stack().between(0, 1).all()
    assert set(a["shots"]) == {2, 8} and set(a["annotator"]) == {"E1", "E2"}
    for name in ("table1.md", "table2.md", "paired.md", "timing.md", "shots_sweep.md", "shots_sweep.png", "table_a1.md",
                 "table_a2.md", "config.yaml"):
        assert (tmp_path / "a" / name).is_file(), name
    assert "Entire-Few" in (tmp_path / "a" / "table1.md").read_text()
    # headroom: each method's share of Entire-Zero -> Entire-All on maF1, recomputed from results.csv
    table = pd.read_csv(tmp_path / "a" / "table1.csv", header=[0, 1, 2], index_col=0)
    main = a[a["shots"] == 8]
    for scenario in ("seen", "unseen"):
        means = main[main["scenario"] == scenario].groupby("method")["maF1"].mean()
        room = means["Entire-All"] - means["Entire-Zero"]
        if room > 0:
            share = 100 * (means["Entire-Few"] - means["Entire-Zero"]) / room
            assert float(table.loc["Entire-Few", (scenario, "tiny_pretrained", "headroom")]) == pytest.approx(share, abs=0.5)
    # paired: Meta-PerSER minus Entire-Few on the same episodes, recomputed from results.csv
    pairs = pd.read_csv(tmp_path / "a" / "paired.csv").set_index(["scenario", "metric"])
    for scenario in ("seen", "unseen"):
        mine = main[(main["scenario"] == scenario)]
        diff = (mine[mine["method"] == "Meta-PerSER"].set_index(["annotator", "seed"])["miF1"]
                - mine[mine["method"] == "Entire-Few"].set_index(["annotator", "seed"])["miF1"])
        assert pairs.loc[(scenario, "miF1"), "mean"] == pytest.approx(100 * diff.mean(), abs=0.01)
        assert pairs.loc[(scenario, "miF1"), "episodes"] == len(diff)

    resumed = pd.read_csv(tmp_path / "a" / "results.csv")
    pd.testing.assert_frame_equal(a, resumed)
    assert "resume: true" in (tmp_path / "a" / "config.yaml").read_text()
    checkpoint = tmp_path / "a" / "checkpoints" / "unseen" / "E1" / "meta-ini1-csmt1-da1-lslr1.safetensors"
    assert checkpoint.is_file()

    everything = mlflow.search_runs(experiment_names=["test"])
    runs = everything[everything["tags.mlflow.parentRunId"].isna()]
    assert len(runs) == 2 and (everything["status"] == "FINISHED").all()
    # the first run meta-trained (2 scenarios x 2 annotators, plus 2 Table 2 variants x 2 unseen annotators;
    # "INI+CSMT+DA+LSLR" is Meta-PerSER itself): each a nested run with per-step losses
    first = runs.sort_values("start_time")["run_id"].iloc[0]
    nested = everything[everything["tags.mlflow.parentRunId"] == first]
    assert len(nested) == 2 * 2 + 2 * 2
    trained = nested[nested["metrics.outer_loss"].notna()]
    assert len(trained) == 2 * 2 + 2  # the repeated Meta-PerSER variant is reused, not trained again
    history = mlflow.MlflowClient().get_metric_history(trained["run_id"].iloc[0], "outer_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert set(runs["params.protocol.shots"]) == {"8"}
    assert runs["metrics.unseen.Entire_Few.maF1"].notna().all()
    # each run registered the Meta-PerSER model it used; a registered version is what `distmeta enroll` adapts
    from distmeta.profiles.listener import ListenerBase

    versions = mlflow.MlflowClient().search_model_versions("name='distmeta-listener'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5]  # first unseen; then all four splits'
    aliases = {alias: int(mlflow.MlflowClient().get_model_version_by_alias("distmeta-listener", alias).version)
               for alias in ("unseen-E1", "seen-E1", "seen-E2", "unseen-E2")}
    assert aliases == {"unseen-E1": 2, "seen-E1": 3, "seen-E2": 4, "unseen-E2": 5}
    on_disk = ListenerBase.load(models / "unseen" / "E1" / "meta-ini1-csmt1-da1-lslr1.safetensors")
    assert ListenerBase.load("models:/distmeta-listener/2").digest == on_disk.digest
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(first)}
    assert {"results.csv", "table1.md", "shots_sweep.png", "tables", "plots"} <= artifacts
    # what the UI shows: the tables and plots logged for it, a described and tagged run in a model-training
    # experiment, and a pyfunc model version with its alias and metrics
    table1 = mlflow.load_table("tables/table1.json", run_ids=[first])
    assert "Meta-PerSER" in set(table1.iloc[:, 0]) or "Meta-PerSER" in " ".join(map(str, table1.to_numpy().ravel()))
    assert "plots/shots_sweep.png" in {f.path for f in mlflow.MlflowClient().list_artifacts(first, "plots")}
    assert mlflow.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
    tags = mlflow.get_run(first).data.tags
    assert tags["path"] == "listener" and tags["upstream"] == "tiny_pretrained" and tags["mlflow.note.content"].startswith("Meta-PerSER")
    info = mlflow.models.get_model_info("models:/distmeta-listener/2")
    assert info.flavors["python_function"]["loader_module"] == "distmeta.profiles.mlflow_model"
    linked = {m.key for m in mlflow.get_logged_model(info.model_id).metrics}  # its own, then the run's that follow
    assert {"unseen.maF1", "unseen.miF1", "unseen.UA", "unseen.Meta_PerSER.maF1", "wall_seconds"} <= linked


def test_a_test_pool_too_small_for_k_and_q_stops_the_job_before_anything_trains(load_job, small_corpus, tmp_path):
    from dataclasses import replace

    from distmeta.data.sources import DataConfig
    from distmeta.settings import MetaTrainConfig

    data = DataConfig(path=str(tmp_path / "corpus"), seed=3, n_utterances=300)
    small_corpus.save(data.path)  # loads as a cache hit: the same seed and size
    config = MetaTrainConfig(data=data)
    config = replace(config, protocol=replace(config.protocol, queries=1000))
    with pytest.raises(SystemExit, match=r"annotator 'E\d+' has \d+ labelled utterances in .*K=32 support \+ Q=1000"):
        load_job("meta_train").setup(config)  # setup checks the pools first, then starts Ray


@pytest.mark.slow
def test_the_smoke_job_on_a_cluster_smaller_than_its_actor_counts_finishes(load_job, tmp_path, monkeypatch, capfd):
    """One CPU; two trainings side by side, each with a one-CPU task actor; three one-CPU episode actors.
    Before, the second training's actor and two episode actors could never be placed and the job waited
    forever; now one training runs at a time and the episodes are scored by the actors Ray places (and by the
    driver while the task actor holds the CPU)."""
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # the job joins it
    try:
        assert load_job("meta_train").main(["--preset", "smoke", f"data.path={tmp_path / 'corpus'}", f"models_dir={tmp_path / 'models'}",
                                            "--out", str(tmp_path / "out"), "experiment=small", "protocol.workers=3",
                                            "actors.num_cpus=1", "parallel=2"]) == 0
    finally:
        ray.shutdown()
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) > 0
    assert "parallel: the cluster holds 1 task actors of this shape, 1 a training: 1 training(s) side by side" in capfd.readouterr().out


@pytest.mark.slow
def test_task_actors_whose_measured_peak_exceeds_their_memory_are_refused_before_training(load_job, small_corpus, ray_local,
                                                                                          tmp_path, monkeypatch):
    """actors.memory_gb is what Ray reserves for each task actor; a second-order meta-gradient measured on a
    worker of that shape needs far more than 10 MB, so the job stops before it pretrains anything."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    small_corpus.save(tmp_path / "corpus")  # loads as a cache hit: the same seed and size
    job = load_job("meta_train")
    args = ["--preset", "smoke", f"data.path={tmp_path / 'corpus'}", "data.seed=3", f"models_dir={tmp_path / 'models'}",
            "--out", str(tmp_path / "out"), "experiment=fits"]
    with pytest.raises(SystemExit, match=r"task actors do not fit: a second-order meta-gradient of tiny_pretrained "
                                         r"peaks at \d+\.\d+ GiB .* actors\.memory_gb=0\.01 gives each actor 0\.01 GiB"):
        job.main(args + ["actors.memory_gb=0.01"])
    assert not (tmp_path / "models" / "seen").exists()  # nothing pretrained
