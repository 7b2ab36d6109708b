"""The ICL job end to end: Ray Train (two DDP workers), real MLflow, tables checked against results.csv."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

JOBS = Path(__file__).parents[2] / "jobs"


def load_job(name):
    spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ua_spk_reference(rows: pd.DataFrame) -> float:
    return sum(accuracy_score(g["label"], g["prediction"]) for _, g in rows.groupby("speaker")) / rows["speaker"].nunique()


@pytest.mark.slow
def test_metaicl_job_smoke(tmp_path, monkeypatch, capsys):
    import mlflow
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job = load_job("metaicl_train")
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["--preset", "smoke", "--out", str(out), f"models_dir={models}", f"data.path={tmp_path / 'speakers'}",
            "experiment=icl-test", "meta.num_workers=2", "meta.cpus_per_worker=1"]
    try:
        assert job.main(args) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert printed.count("training speech LM") == 5  # stage 1, TU+LU, TO+LD, Neutral, Neutral1

    results = pd.read_csv(out / "results.csv", keep_default_na=False)
    words = ["Neutral", "Surprise", "Sadness", "Joy", "Fear", "Disgust", "Anger"]
    assert set(results["label"]) == set(words) and set(results["prediction"]) <= set(words)
    assert set(results["model"]) == {"Scratch", "Pretrained", "Personalized_N", "Personalized_A", "0-shot", "1-shot_N",
                                     "Proposed", "Proposed (TO+LD_7)", "Proposed (Neutral_0:7)"}
    test_speakers = results["speaker"].nunique()
    per_condition = results.groupby(["model", "setting", "emotion", "k"]).size()
    assert (per_condition == per_condition.iloc[0]).all() and per_condition.iloc[0] == test_speakers * 7 * 3

    # Table II against per-speaker accuracies from results.csv (scikit-learn)
    table2 = pd.read_csv(out / "table2.csv", keep_default_na=False)
    for _, row in table2.iterrows():
        rows = results[results["model"] == row["model"]]
        if row["model"] == "Proposed":
            k = int(row["ICL"].split("-")[0])
            rows = rows[(rows["k"] == k) & rows["setting"].isin(["", "TU+LD", "TO+LD"])]
            assert row["setting"] == {0: "-", 7: "TO+LD"}.get(k, "TU+LD")
        assert row["UA_spk"] == pytest.approx(ua_spk_reference(rows))
    assert [r for r in table2["ICL"] if r.endswith("-shot")] == ["1-shot"] + [f"{k}-shot" for k in range(8)]

    table3 = pd.read_csv(out / "table3.csv", index_col=0)
    assert list(table3.index) == [f"{k}-shot" for k in range(1, 7)]
    assert {"TU+LD", "TU+LU", "TE+LD", "TE+LU", "TU+LO Anger", "TU+LO Neutral"} <= set(table3.columns)
    lo = results[(results["model"] == "Proposed") & (results["setting"] == "TU+LO") & (results["emotion"] == "angry")
                 & (results["k"] == 2)]
    assert table3.loc["2-shot", "TU+LO Anger"] == pytest.approx(ua_spk_reference(lo))
    table4 = pd.read_csv(out / "table4.csv", index_col=0)
    assert len(table4) == 6 and (out / "shots.png").stat().st_size > 0

    run = mlflow.search_runs(experiment_names=["icl-test"]).iloc[0]
    assert run["status"] == "FINISHED" and run["params.model.llm"] == "tiny" and run["metrics.best_val_loss_TU_LU"] > 0
    assert run["metrics.UA_spk_Proposed_7_shot"] == pytest.approx(ua_spk_reference(
        results[(results["model"] == "Proposed") & (results["k"] == 7)]))
    assert run["metrics.UA_spk_Pretrained"] == pytest.approx(ua_spk_reference(results[results["model"] == "Pretrained"]))

    # The saved models: safetensors + sidecars; a rerun with the same settings reuses them
    sidecars = sorted(models.glob("speech_lm-*.json"))
    assert len(sidecars) == 5 and all(json.loads(p.read_text())["best_step"] > 0 for p in sidecars)
    stamps = {p: p.stat().st_mtime_ns for p in models.glob("speech_lm-*.safetensors")}
    try:
        assert job.main(args + ["baselines=false", "ablation=false", f"--out={tmp_path / 'again'}"]) == 0
    finally:
        ray.shutdown()
    assert "training speech LM" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = pd.read_csv(tmp_path / "again" / "results.csv", keep_default_na=False)
    proposed = results[results["model"] == "Proposed"].reset_index(drop=True)
    pd.testing.assert_frame_equal(again[again["model"] == "Proposed"].reset_index(drop=True), proposed)
