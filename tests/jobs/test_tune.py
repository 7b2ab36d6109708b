"""The sweep job end to end: real Ray Tune trials over the meta-trainer, real MLflow, the best config fed back."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

SPACE = Path(__file__).parents[2] / "tune_spaces" / "meta_perser_smoke.yaml"  # the smoke preset's


def child_runs(experiment):
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment])
    return runs[runs["tags.mlflow.parentRunId"].notna()], runs[runs["tags.mlflow.parentRunId"].isna()]


@pytest.mark.slow
def test_sweep_with_actors_in_placement_groups_mlflow_and_best_config(load_job, listener_smoke, tmp_path, monkeypatch):
    import ray
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    tune_job, meta_job = load_job("tune"), load_job("meta_train")
    # the smoke preset's shared corpus and models (the main job's smoke test pretrained them, when it ran first);
    # trials read neither: both reach them through Ray
    common = [f"base.data.path={listener_smoke['corpus']}", f"base.models_dir={listener_smoke['models']}"]
    # Each trial reserves 0.2 + 9 x 0.1 CPUs: two do not fit on 2 CPUs at once, and the 9 task actors
    # only find CPUs if they are scheduled inside their trial's placement group.
    args = ["--preset", "smoke", "--out", str(tmp_path / "tune"), "experiment=sweep-test",
            "sweep.trial_cpus=0.2", "base.actors.num_cpus=0.1", *common]
    try:
        assert tune_job.main(args) == 0
        trials, parents = child_runs("sweep-test")
        assert len(parents) == 1 and len(trials) == 2 and (trials["status"] == "FINISHED").all()
        assert (trials["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).all()

        space = yaml.safe_load(SPACE.read_text())
        for _, trial in trials.iterrows():
            assert 3e-4 <= float(trial["params.meta.inner_lr"]) <= 3e-2
            assert 3e-5 <= float(trial["params.meta.outer_lr"]) <= 3e-3
            assert int(trial["params.meta.shots"]) in space["meta.shots"]["choice"]
            assert int(trial["params.meta.inner_steps"]) in space["meta.inner_steps"]["choice"]
            assert 0.0 <= float(trial["params.meta.da_first_order_fraction"]) <= 0.6
        ordered = trials.sort_values("start_time")
        assert ordered["end_time"].iloc[0] <= ordered["start_time"].iloc[1]  # the reservation kept them apart

        # The best trial from MLflow's own metric histories: the highest validation macro-F1 at any step, the
        # criterion meta.select (maF1 by default) picks each trial's model by
        client = MlflowClient()
        histories = {r: [m.value for m in client.get_metric_history(r, "val_maF1")] for r in trials["run_id"]}
        assert all(len(h) >= 2 for h in histories.values())  # a report per validation, i.e. per outer step
        best = trials.set_index("run_id").loc[max(histories, key=lambda r: max(histories[r]))]
        exported = yaml.safe_load((tmp_path / "tune" / "best_config.yaml").read_text())
        for key in space:
            assert str(exported["meta"][key.split(".")[1]]) == best[f"params.{key}"], key
        table = pd.read_csv(tmp_path / "tune" / "sweep.csv")
        assert len(table) == 2 and table["best val_maF1"].iloc[0] == pytest.approx(max(map(max, histories.values())))
        assert table["best val_maF1"].is_monotonic_decreasing  # best trial first
        assert (tmp_path / "tune" / "sweep.png").stat().st_size > 0

        # ... and the main job takes the exported file unchanged
        out = tmp_path / "meta"
        assert meta_job.main(["--preset", "smoke", "--config", str(tmp_path / "tune" / "best_config.yaml"), "--out", str(out),
                              "protocol.scenarios=[unseen]", "protocol.methods=[Meta-PerSER]", "protocol.table2=[]",
                              "protocol.sweep_shots=[]", "distributed=false", "experiment=main-test"]) == 0
    finally:
        ray.shutdown()
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"Meta-PerSER"} and len(results) == 2  # E1, E2 x 1 seed
    used = yaml.safe_load((out / "config.yaml").read_text())["meta"]
    assert used == exported["meta"]


@pytest.mark.slow
def test_speech_lm_sweep_with_optuna_and_its_best_config_runs_the_icl_job(load_job, tmp_path, monkeypatch):
    """Also the search and scheduler the listener sweep above does not use: Optuna, and no ASHA (FIFO)."""
    import ray
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the space's relative path still resolves (against the project)
    tune_job, icl_job = load_job("tune"), load_job("metaicl_train")
    space = yaml.safe_load((SPACE.parent / "metaicl_smoke.yaml").read_text())
    try:
        assert tune_job.main(["--space", "tune_spaces/metaicl_smoke.yaml", "--preset", "smoke", "--out", str(tmp_path / "tune"),
                              "experiment=icl-sweep-test", f"icl_base.models_dir={tmp_path / 'models'}",
                              "sweep.search=optuna", "sweep.asha=false"]) == 0
        trials, parents = child_runs("icl-sweep-test")
        assert len(parents) == 1 and len(trials) == 2 and (trials["status"] == "FINISHED").all()
        assert trials["params.meta.lr"].nunique() == 2
        for _, trial in trials.iterrows():
            assert 1e-3 <= float(trial["params.meta.lr"]) <= 1e-2
            for key in ("model.lora_rank", "model.num_queries", "model.max_shots"):
                assert int(trial[f"params.{key}"]) in space[key]["choice"]
        client = MlflowClient()  # ASHA's metric, reported after each validation of the TU+LU stage
        histories = {r: [m.value for m in client.get_metric_history(r, "val_loss")] for r in trials["run_id"]}
        best = trials.set_index("run_id").loc[min(histories, key=lambda r: min(histories[r]))]
        exported = yaml.safe_load((tmp_path / "tune" / "best_config.yaml").read_text())
        for key in space:
            if key != "job":
                section, name = key.split(".")
                assert str(exported[section][name]) == best[f"params.{key}"], key
        table = pd.read_csv(tmp_path / "tune" / "sweep.csv")
        assert table["best val_loss"].min() == pytest.approx(min(map(min, histories.values())))
        assert (table["steps run"] == 30).all() and not table["stopped early"].any()  # no ASHA: every trial ran

        # the speech LM job takes the exported file unchanged (the baselines, MAML and Table IV left out for time)
        out = tmp_path / "icl"
        assert icl_job.main(["--preset", "smoke", "--config", str(tmp_path / "tune" / "best_config.yaml"), "--out", str(out),
                             "baselines=false", "maml.enabled=false", "ablation=false", "experiment=icl-main-test"]) == 0
    finally:
        ray.shutdown()
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["model"] == exported["model"] and used["meta"] == exported["meta"]
    results = pd.read_csv(out / "results.csv")
    assert results[results["model"] == "Proposed"]["k"].max() == min(int(exported["model"]["max_shots"]), 7)
