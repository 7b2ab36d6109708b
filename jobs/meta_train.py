"""The main job: listener personalization end to end, from pretraining to Table 1.

    python jobs/meta_train.py                     # synthetic corpus, tiny upstream, local Ray, local MLflow
    python jobs/meta_train.py --preset smoke      # the same in a few minutes
    python jobs/meta_train.py --resume runs/meta_train      # continue an interrupted run
    python jobs/meta_train.py --preset paper --estimate     # projected wall time, GPU-hours, peak memory; trains nothing
    ray job submit --working-dir . -- python jobs/meta_train.py data.source=iemocap data.path=/data/IEMOCAP_full_release

1. setup:      the corpus, the rotation of test / validation / training annotators.
2. pretrain:   SSL-E, Linear and Multi per split, as one Ray Train run (models already in
               `models_dir` with the same settings are reused).
3. meta-train: Meta-PerSER per split (and the Table 2 variants, unseen scenario) on Ray
               task actors holding the training annotators' tasks (actors.max_actors); checkpoints every
               `checkpoint_every` outer steps under `out/checkpoints`.
4. meta-test:  the protocol for every method; results.csv, table1.md, table2.md,
               shots_sweep.{md,csv,png}, table_a1.md / table_a2.md, config.yaml under `out`.
Everything is logged to MLflow: the job is one run, each meta-training a nested run
with its per-step outer and validation losses.
"""

import functools
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from distmeta import config as cfg
from distmeta import tracking
from distmeta.cluster import beside_workers, connect, placeable
from distmeta.data.scenarios import TooFewItems, rotation
from distmeta.data.sources import load_corpus
from distmeta.io import atomic_path
from distmeta.listener.adapters import baseline_adapters, meta_adapter
from distmeta.listener.estimate import check_fits, measure, project
from distmeta.listener.metatrain import meta_model_path, meta_train_cached, meta_variants
from distmeta.listener.pretrain import kinds_for, pretrain_rotation
from distmeta.listener.workers import EpisodeWorkers
from distmeta.listener.protocol import (paired, plot_sweep, run_episodes, sweep_note, sweep_table, table1,
                                       table2)
from distmeta.meta.actors import ActorPool
from distmeta.profiles.mlflow_model import log_model
from distmeta.report import save_table, say
from distmeta.settings import MetaTrainConfig
from distmeta.training.tiny_wavlm import ready as build_upstream


def setup(config: MetaTrainConfig):
    corpus = load_corpus(config.data)
    splits = {s: rotation(corpus, s, config.protocol.test_annotators or None) for s in config.protocol.scenarios}
    for scenario_splits in splits.values():  # before anything trains: every test pool must hold Table 1's K + Q
        for split in scenario_splits:
            try:
                split.test_task(corpus).sample(config.protocol.shots, config.protocol.queries)
            except TooFewItems as error:
                raise SystemExit(f"{error}: lower protocol.shots or protocol.queries, or leave the annotator out "
                                 f"of protocol.test_annotators") from None
    connect(config.ray_address)
    build_upstream(config.upstream)  # a tiny upstream is built here once, before any worker needs it
    return corpus, splits


def pretrain_models(config: MetaTrainConfig, splits, inputs=None) -> dict:
    return pretrain_rotation(kinds_for(config.protocol.methods, config.protocol.table2), config.data, config.upstream, config.pretrain, splits, config.models_dir,
                             config.storage, inputs)


def register_meta_perser(config: MetaTrainConfig, splits, results) -> list[int]:
    """Register Meta-PerSER models as `distmeta-listener` (pyfunc; what `distmeta enroll --model
    models:/distmeta-listener/<version>` adapts and `mlflow models serve` serves): the first unseen split's
    (else the first split's), or every split's (`register: all`), each with the alias <scenario>-<annotator>
    and its scenario's Meta-PerSER metrics."""
    if "Meta-PerSER" not in config.protocol.methods or config.register == "none":
        return []
    first = "unseen" if "unseen" in splits else next(iter(splits))
    chosen = [(first, splits[first][0])] + ([(s, split) for s in splits for split in splits[s]
                                             if (s, split) != (first, splits[first][0])] if config.register == "all" else [])
    versions = []
    for scenario, split in chosen:
        path = meta_model_path(config.models_dir, scenario, split.test_annotator, config.meta)
        scored = results[(results["method"] == "Meta-PerSER") & (results["scenario"] == scenario)
                         & (results["shots"] == config.protocol.shots)]
        metrics = {f"{scenario}.{metric}": float(scored[metric].mean()) for metric in ("maF1", "miF1", "UA") if len(scored)}
        alias = f"{scenario}-{split.test_annotator}"
        version = log_model([path, path.with_suffix(".json")], "distmeta-listener", metrics=metrics, aliases=(alias,),
                            tags={"path": "listener", "scenario": scenario, "test_annotator": split.test_annotator,
                                  "upstream": config.upstream.name})
        print(f"registered {path} as models:/distmeta-listener/{version} (@{alias})", flush=True)
        versions.append(version)
    return versions


def meta_train(config: MetaTrainConfig, corpus, scenario, split, checkpoints, pools: list, inputs) -> dict:
    """Meta-train (or reuse) every Meta-PerSER variant for one split, each a nested MLflow run. The variants
    train side by side, one per actor pool in `pools` (a list of [None] trains serially in process), each
    printing its lines under its own name; a model two variants share trains once, and its one adapter serves
    both (run_episodes then scores its episodes once)."""
    import mlflow
    from concurrent.futures import ThreadPoolExecutor

    variants = meta_variants(config.meta, config.protocol.methods, config.protocol.table2, scenario)
    parent = mlflow.active_run().info.run_id
    by_path = {}  # model file -> the variants it serves (Meta-PerSER is Table 2's last row)
    for method, meta_config in variants.items():
        by_path.setdefault(meta_model_path(config.models_dir, scenario, split.test_annotator, meta_config), []).append(method)

    def train(path: Path, methods: list, actors) -> dict:
        states = {}
        for method in methods:  # the first trains, the others reuse its file
            meta_config = variants[method]
            print(f"meta-training {method} ({scenario}, test {split.test_annotator}, validation {split.val_annotator})", flush=True)
            with mlflow.start_run(run_name=f"{method} {scenario} {split.test_annotator}", nested=True,
                                  parent_run_id=parent) as run:
                mlflow.log_params({**cfg.flatten(asdict(meta_config), "meta."), "scenario": scenario,
                                   "test_annotator": split.test_annotator, "method": method})
                steps = tracking.StepMetrics(run.info.run_id)
                states[method] = meta_train_cached(
                    path, corpus, split, config.upstream, checkpoints["ssl_e"], meta_config, asdict(config.data),
                    config.pretrain.max_seconds, log=functools.partial(say, method), actors=actors, on_step=steps.add,
                    checkpoint=Path(config.out) / "checkpoints" / path.relative_to(config.models_dir),
                    checkpoint_every=config.checkpoint_every, resume=config.resume, inputs=inputs)
                steps.flush()
        return states

    jobs = list(by_path.items())
    with ThreadPoolExecutor(len(pools)) as side_by_side:  # pool i trains every len(pools)-th model
        shares = [side_by_side.submit(lambda share, actors: [train(p, m, actors) for p, m in share], jobs[i::len(pools)], pool)
                  for i, pool in enumerate(pools)]
        states = {method: state for share in shares for done in share.result() for method, state in done.items()}
    adapters = {}  # one per model file: variants sharing a model share its adapter, and run_episodes scores it once
    for path, methods in by_path.items():
        shared = meta_adapter(methods[0], corpus, split, config.upstream, states[methods[0]], variants[methods[0]],
                              config.pretrain.max_seconds, inputs)
        adapters.update(dict.fromkeys(methods, shared))
    return {method: adapters[method] for method in variants}


def job_inputs(config: MetaTrainConfig, corpus):
    """Every model of the job shares the upstream's frozen conv encoder: its outputs (or the audio), once."""
    from distmeta.features import AudioBank, input_bank
    from distmeta.models.upstream import Upstream

    return input_bank(Upstream(config.upstream), AudioBank(corpus, corpus.utterances.index, config.pretrain.max_seconds))


def evaluate(config: MetaTrainConfig, corpus, splits, checkpoints, seconds: dict, inputs) -> pd.DataFrame:
    """Meta-train and meta-test every split; adds the wall seconds of both phases to `seconds`.

    With episode actors (`protocol.workers`) a split's meta-test runs in a second driver thread while the
    next split meta-trains: the trainings leave cores idle (validation, one model's actor waiting for its
    driver thread) that the episode actors fill. The two phases' seconds then overlap. In process, the
    meta-test waits for its turn: adapters there seed torch's global random state, which trainings share."""
    from concurrent.futures import ThreadPoolExecutor

    parallel = max(1, config.parallel)
    if config.distributed and parallel > 1:  # the trainings' pools together must fit, or one waits forever
        tasks = max(len(split.train_annotators) for scenario_splits in splits.values() for split in scenario_splits)
        per_pool = min(tasks, config.actors.max_actors or tasks)
        fits = placeable("task actors (actors.num_cpus, actors.num_gpus, actors.memory_gb)", config.actors.num_cpus,
                         config.actors.num_gpus, config.actors.memory)
        if fits < parallel * per_pool:
            parallel = max(1, min(parallel, fits // per_pool))
            print(f"parallel: the cluster holds {fits} task actors of this shape, {per_pool} a training: "
                  f"{parallel} training(s) side by side", flush=True)
    pools = [ActorPool(config.actors) if config.distributed else None for _ in range(parallel)]
    workers = (EpisodeWorkers(config.protocol.workers, num_gpus=config.protocol.worker_gpus)
               if config.protocol.workers else None)
    testing, tests = ThreadPoolExecutor(1), []  # one meta-test at a time, in split order

    def meta_test(scenario, split, adapters, methods) -> list[dict]:
        began = time.time()
        print(f"meta-test: {scenario}, test annotator {split.test_annotator}", flush=True)
        labels = {"scenario": scenario, "upstream": config.upstream.name}
        rows = run_episodes(adapters, split.test_task(corpus), replace(config.protocol, methods=tuple(methods)), labels,
                            workers=workers)
        seconds["meta-test"] = seconds.get("meta-test", 0.0) + time.time() - began
        return rows

    try:
        for scenario, scenario_splits in splits.items():
            for split in scenario_splits:
                found = checkpoints[(scenario, split.test_annotator)]
                began = time.time()
                metas = meta_train(config, corpus, scenario, split, found, pools, inputs)
                baselines = [m for m in config.protocol.methods if m != "Meta-PerSER"]
                adapters = {**baseline_adapters(baselines, corpus, split, found, config.upstream, config.protocol.adapt,
                                                config.pretrain.max_seconds, config.protocol.ceiling, inputs), **metas}
                seconds["meta-train"] = seconds.get("meta-train", 0.0) + time.time() - began
                methods = list(config.protocol.methods) + [m for m in metas if m.startswith("Meta[")]
                [test.result() for test in tests if test.done()]  # a failed meta-test stops the job now
                tests.append(testing.submit(meta_test, scenario, split, adapters, methods))
                if workers is None:
                    tests[-1].result()
        for pool in pools:  # meta-training is over: the task actors give their resources to the episode actors
            if pool is not None:
                pool.shutdown()
        rows = [row for test in tests for row in test.result()]
    finally:
        testing.shutdown(cancel_futures=True)
        for pool in (*pools, workers):
            if pool is not None:
                pool.shutdown()
    return pd.DataFrame(rows)


def save(config: MetaTrainConfig, corpus, splits, results: pd.DataFrame) -> dict:
    out = Path(config.out)
    timing = results.groupby("method")["seconds"].agg(episodes="count", mean="mean", total="sum").sort_values("total")
    results = results.drop(columns="seconds")  # results.csv: what a rerun reproduces exactly
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    main = table1(results[~results["method"].str.startswith("Meta[")], config.protocol.shots)
    paths = {"results": out / "results.csv",
             "timing": save_table(timing, out, "timing", "Meta-test seconds per episode (adaptation + prediction)", ".2f"),
             "table1": save_table(main, out, "table1", f"Table 1: K={config.protocol.shots}, Q={config.protocol.queries}, "
                                  f"mean ± 95% CI over test annotators x seeds (%)")}
    comparison = paired(results, *config.protocol.paired, config.protocol.shots)
    if not comparison.empty:
        paths["paired"] = save_table(comparison, out, "paired", f"Paired comparison per episode, K={config.protocol.shots}: "
                                     "mean difference and 95% t-interval (points)", ".2f")
    ablation = table2(results[results["shots"] == config.protocol.shots], config.protocol.table2)
    if not ablation.empty:
        paths["table2"] = save_table(ablation, out, "table2", "Table 2: components added one by one, unseen scenario, "
                                     "mean ± 95% CI (%)")
    sweep_methods = [m for m in config.protocol.sweep_methods if m in config.protocol.methods]
    if sweep_methods and len(set(results["shots"])) > 1:
        seeds = config.protocol.sweep_seed_count  # every K on the same episodes, Table 1's K too
        swept = results[results["seed"] < seeds]
        paths["sweep"] = save_table(sweep_table(swept, sweep_methods), out, "shots_sweep", "Shots sweep (Table A4 layout), "
                                    f"mean over test annotators x {seeds} seed{'s' * (seeds > 1)} (%)"
                                    + sweep_note(swept, sweep_methods, config.protocol.shots))
        plot_sweep(swept, sweep_methods, out / "shots_sweep.png")
        paths["sweep_plot"] = out / "shots_sweep.png"
    for scenario, name in (("seen", "table_a1"), ("unseen", "table_a2")):
        if scenario in splits:
            tests = [s.test_annotator for s in splits[scenario]]
            pool = corpus.utterances.index[corpus.utterances["session"].isin(splits[scenario][0].test_sessions)]
            dist = corpus.label_distribution(tests, pool)
            dist.index.name = "class"
            paths[name] = save_table(dist, out, name, f"Label distribution of the test annotators, {scenario} scenario (%)", ".2f")
    return paths


# What a run's models and checkpoints depend on: resuming with any of it changed would continue on other
# data. The rest (protocol, actors, out, tracking) may change on resume.
SHAPING_SECTIONS = ("data", "upstream", "pretrain", "meta")


def estimate(config: MetaTrainConfig) -> int:
    """--estimate: measure one of each unit of the run where the run would do it, project the whole run."""
    started = time.time()
    corpus, splits = setup(config)
    inputs = job_inputs(config, corpus)
    measured = measure(config, corpus, splits, inputs)
    plan = project(config, corpus, splits, measured, setup_seconds=time.time() - started)
    path = save_table(plan, Path(config.out), "estimate",
                      f"Estimate of the whole run: units measured on {measured['device']} ({measured['threads']} torch "
                      f"thread(s)), counted from the config; wall = compute / at once; Ray, actor and MLflow start-up "
                      f"not included", ".3g")
    total = plan.loc["whole run"]
    print("\n" + Path(path).read_text())
    print(f"projected: {total['wall_s'] / 3600:.2f} h wall, {total['gpu_hours']:.2f} GPU-hours, peak "
          f"{total['peak_gib']:.2f} GiB per worker ({measured['device']}); written to {Path(path).resolve()}")
    return 0


def main(argv=None) -> int:
    argv = cfg.resume_args(list(sys.argv[1:] if argv is None else argv), "meta_train")
    estimate_only = "--estimate" in argv
    config = cfg.parse_args(MetaTrainConfig, [a for a in argv if a != "--estimate"], job="meta_train",
                            description=__doc__.split("\n")[0],
                            epilog="--resume DIR  continue the interrupted run in DIR with its own config.yaml (overrides "
                                   "may follow; data, upstream, pretrain and meta settings must stay as they were); "
                                   "--estimate  measure one unit of each phase and print the whole run's projected "
                                   "wall time, GPU-hours and peak memory, training nothing")
    if estimate_only:
        return estimate(config)
    if config.resume:
        cfg.check_resumable(MetaTrainConfig, config, SHAPING_SECTIONS)
    if config.register not in ("first", "all", "none"):
        raise SystemExit(f"register: {config.register!r}; use first, all or none")
    started = time.time()
    cfg.save(config, Path(config.out) / "config.yaml")
    description = (f"Meta-PerSER on {config.upstream.name}, {config.data.source} corpus (seed {config.data.seed}): "
                   f"SSL-E, meta-training and the meta-test protocol ({', '.join(config.protocol.scenarios)})")
    tags = {"path": "listener", "upstream": config.upstream.name, "corpus": config.data.source, "seed": config.data.seed}
    with tracking.run(config.experiment, f"meta_train-{config.upstream.name}", asdict(config), description, tags) as mlflow:
        seconds = {}
        corpus, splits = setup(config)
        inputs = job_inputs(config, corpus)
        check_fits(config, corpus, splits, inputs)  # before anything trains: a task actor's measured peak must fit
        seconds["setup"] = time.time() - started
        # From here on Ray workers compute and the driver's small ops run beside them, unless the meta-training
        # and the meta-test both run in this process (the serial reference), which then keeps its threads.
        beside = config.distributed or config.protocol.workers
        with beside_workers() if beside else nullcontext():
            checkpoints = pretrain_models(config, splits, inputs)
            seconds["pretrain"] = time.time() - started - seconds["setup"]
            results = evaluate(config, corpus, splits, checkpoints, seconds, inputs)
        seconds["meta-train and meta-test wall"] = time.time() - started - seconds["setup"] - seconds["pretrain"]  # they overlap
        paths = save(config, corpus, splits, results)
        register_meta_perser(config, splits, results)
        for (method, scenario), group in results[results["shots"] == config.protocol.shots].groupby(["method", "scenario"]):
            for metric in ("maF1", "miF1", "UA"):
                mlflow.log_metric(tracking.metric_name(scenario, method, metric), float(group[metric].mean()))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(Path(config.out) / "config.yaml"))
        mlflow.log_metric("wall_seconds", time.time() - started)
        mlflow.log_metrics({f"seconds.{phase}": value for phase, value in seconds.items()})
    print("\n" + Path(paths["table1"]).read_text())
    for name in ("paired", "table2"):
        if name in paths:
            print(Path(paths[name]).read_text())
    print("profile: " + ", ".join(f"{phase} {value:.0f}s" for phase, value in seconds.items()))
    print(f"wall time {time.time() - started:.0f}s; written to {Path(config.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
