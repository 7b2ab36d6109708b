"""Meta-test protocol for the listener-personalization baselines: Table 1, the shots sweep, Tables A1/A2.

    python jobs/evaluate.py                       # synthetic corpus, tiny upstream, local Ray, local MLflow
    python jobs/evaluate.py --preset smoke        # the same in about two minutes
    python jobs/evaluate.py data.source=iemocap data.path=/data/IEMOCAP_full_release upstream.name=wavlm_base

Pretrains what it needs (SSL-E, Linear, Multi per scenario and test annotator)
as one Ray Train run, reusing models already in `models_dir`; then runs the
protocol and writes under `out`: results.csv, table1.md, shots_sweep.{md,csv,png},
table_a1.md / table_a2.md and config.yaml. Everything is logged to MLflow.
"""

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from distmeta import config as cfg
from distmeta import tracking
from distmeta.adapters import baseline_adapters
from distmeta.data.scenarios import rotation
from distmeta.data.sources import DataConfig, load_corpus
from distmeta.io import atomic_path
from distmeta.models.upstream import UpstreamConfig
from distmeta.pretrain import KIND_OF_METHOD, PretrainConfig, pretrain_rotation
from distmeta.protocol import ProtocolConfig, plot_sweep, run_episodes, sweep_table, table1
from distmeta.report import markdown_table, save_table


@dataclass
class EvaluateConfig:
    data: DataConfig = field(default_factory=DataConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    out: str = "runs/evaluate"
    models_dir: str = "runs/models"  # pretrained models, shared between jobs and reused when settings match
    experiment: str = "distmeta-evaluate"
    ray_address: str = "local"  # "auto" joins a running cluster


PRESETS = {
    "smoke": {
        "data": {"n_utterances": 300},
        "pretrain": {"epochs": 1},
        "protocol": {"test_annotators": ["E1", "E2"], "seeds": 1, "shots": 8, "queries": 16,
                     "sweep_shots": [2, 8], "adapt": {"steps": 5}},
        "out": "runs/evaluate-smoke",
        "models_dir": "runs/models-smoke",
    },
}


def setup(config: EvaluateConfig):
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
    corpus = load_corpus(config.data)
    splits = {s: rotation(corpus, s, config.protocol.test_annotators or None) for s in config.protocol.scenarios}
    return corpus, splits


def pretrain_models(config: EvaluateConfig, splits) -> dict:
    kinds = sorted({KIND_OF_METHOD[m] for m in config.protocol.methods if m in KIND_OF_METHOD})
    if "multi" in kinds and "linear" not in kinds:
        kinds.append("linear")  # Multi-Few adapts on the Linear model's frozen-upstream features
    return pretrain_rotation(kinds, config.data, config.upstream, config.pretrain, splits, config.models_dir)


def evaluate(config: EvaluateConfig, corpus, splits, checkpoints) -> pd.DataFrame:
    rows = []
    for scenario, scenario_splits in splits.items():
        for split in scenario_splits:
            print(f"meta-test: {scenario}, test annotator {split.test_annotator}", flush=True)
            adapters = baseline_adapters(config.protocol.methods, corpus, split, checkpoints[(scenario, split.test_annotator)],
                                         config.upstream, config.protocol.adapt, config.pretrain.max_seconds)
            labels = {"scenario": scenario, "upstream": config.upstream.name}
            rows += run_episodes(adapters, split.test_task(corpus), config.protocol, labels)
    return pd.DataFrame(rows)


def save(config: EvaluateConfig, corpus, splits, results: pd.DataFrame) -> dict:
    out = Path(config.out)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    main = table1(results, config.protocol.shots)
    paths = {"results": out / "results.csv",
             "table1": save_table(main, out, "table1", f"Table 1: K={config.protocol.shots}, Q={config.protocol.queries}, "
                                  f"mean ± 95% CI over test annotators x seeds (%)")}
    sweep_methods = [m for m in config.protocol.sweep_methods if m in config.protocol.methods]
    if sweep_methods and len(set(results["shots"])) > 1:
        paths["sweep"] = save_table(sweep_table(results, sweep_methods), out, "shots_sweep", "Shots sweep (Table A4 layout), mean (%)")
        plot_sweep(results, sweep_methods, out / "shots_sweep.png")
        paths["sweep_plot"] = out / "shots_sweep.png"
    for scenario, name in (("seen", "table_a1"), ("unseen", "table_a2")):
        if scenario in splits:
            tests = [s.test_annotator for s in splits[scenario]]
            pool = splits[scenario][0].test_task(corpus).utterances if scenario == "unseen" else None
            pool = None if pool is None else corpus.utterances.index[corpus.utterances["session"].isin(splits[scenario][0].test_sessions)]
            dist = corpus.label_distribution(tests, pool)
            dist.index.name = "class"
            paths[name] = save_table(dist, out, name, f"Label distribution of the test annotators, {scenario} scenario (%)", ".2f")
    return paths


def main(argv=None) -> int:
    config = cfg.parse_args(EvaluateConfig, argv, presets=PRESETS, description=__doc__.split("\n")[0])
    started = time.time()
    cfg.save(config, Path(config.out) / "config.yaml")
    with tracking.run(config.experiment, f"evaluate-{config.upstream.name}", asdict(config)) as mlflow:
        corpus, splits = setup(config)
        checkpoints = pretrain_models(config, splits)
        results = evaluate(config, corpus, splits, checkpoints)
        paths = save(config, corpus, splits, results)
        for (method, scenario), group in results[results["shots"] == config.protocol.shots].groupby(["method", "scenario"]):
            for metric in ("maF1", "miF1", "UA"):
                mlflow.log_metric(f"{scenario}.{method}.{metric}".replace("-", "_"), float(group[metric].mean()))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(Path(config.out) / "config.yaml"))
        mlflow.log_metric("wall_seconds", time.time() - started)
    print("\n" + markdown_table(table1(results, config.protocol.shots)))
    print(f"wall time {time.time() - started:.0f}s; written to {Path(config.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
