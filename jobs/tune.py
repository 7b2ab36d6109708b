"""Sweep Meta-PerSER's (or the speech LM's) hyperparameters with Ray Tune; every trial an MLflow run; export the best config.

    python jobs/tune.py                                   # tune_spaces/meta_perser.yaml on the synthetic corpus, minutes
    python jobs/tune.py --preset smoke                    # 2 short trials
    python jobs/tune.py --space tune_spaces/meta_perser.yaml sweep.num_samples=32 sweep.search=optuna
    python jobs/meta_train.py --config runs/tune/best_config.yaml   # the winner, end to end
    python jobs/tune.py --space tune_spaces/metaicl.yaml  # the speech LM (the space says job: metaicl_train)
    python jobs/metaicl_train.py --config runs/tune/best_config.yaml

1. setup:   Meta-PerSER: the corpus, the split whose validation annotator scores trials (its test
            annotator is never looked at), SSL-E for that split (reused from `base.models_dir`),
            and what trials read, handed to them through the object store (SSL-E's weights,
            the upstream's checkpoint, the split's input bank): trials may run on any node.
            Speech LM: the speaker corpus and the frozen encoder's frames (`icl_base`), the same way.
2. sweep:   a Tuner over `distmeta.sweep.meta_trial` (the distributed meta-trainer, its task
            actors inside the trial's placement group) or `icl_trial` (stage 1 + MetaICL in the
            trial), ASHA on the validation loss reported after every validation (`base.meta.val_every`,
            1 here = every outer step; `icl_base.meta.val_every`), random or Optuna search; each trial
            is an MLflow run nested under the sweep's run.
3. save:    sweep.{md,csv} (trial, params, best validation loss, steps run, early stop),
            sweep.png (validation loss per step per trial) and best_config.yaml: the best
            trial's complete `jobs/meta_train.py` (or `jobs/metaicl_train.py`) config.
"""

import sys
import time
from dataclasses import asdict
from pathlib import Path

from distmeta import config as cfg
from distmeta import tracking
from distmeta.cluster import connect
from distmeta.data.scenarios import rotation
from distmeta.data.sources import load_corpus
from distmeta.settings import MetaICLJobConfig, MetaTrainConfig, TuneJobConfig
from distmeta.training.tiny_wavlm import ready as build_upstream
from distmeta.meta.learner import selection
from distmeta.listener.pretrain import pretrain_rotation
from distmeta.report import save_table
from distmeta.sweep import (SPEECH_LM_OBJECTIVE, check_shots, concurrent_trials, icl_trial, load_space, meta_trial, plot_trials, space_job, sweep_table,
                            trial_resources, with_params)
from distmeta.training.launcher import storage_path


def space_path(name: str) -> Path:
    """A space file as given, else relative to the project (so `tune_spaces/...` works from any folder)."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parents[1] / path


def setup_icl(config: TuneJobConfig):
    """The space, the speaker data and the frozen encoder's frames (computed once, kept in `icl_base.models_dir`)."""
    from distmeta.data.speakers import speaker_view
    from distmeta.features import FrameBank
    from distmeta.speaker.encoder import ready_upstream
    from distmeta.speaker.metaicl import frame_bank

    base = config.icl_base
    connect(base.ray_address)
    space = load_space(space_path(config.sweep.space), MetaICLJobConfig)
    corpus = load_corpus(base.data)
    data = speaker_view(corpus)
    upstream = ready_upstream(base.upstream, base.encoder, corpus, data, base.models_dir, base.storage)
    return space, data, FrameBank.load(frame_bank(corpus, upstream, base.encoder_layer, base.models_dir))


def setup(config: TuneJobConfig):
    connect(config.base.ray_address)
    space = load_space(space_path(config.sweep.space), MetaTrainConfig)
    corpus = load_corpus(config.base.data)
    build_upstream(config.base.upstream)
    splits = rotation(corpus, config.sweep.scenario, [config.sweep.test_annotator] if config.sweep.test_annotator else None)
    split = splits[0]
    check_shots(space, config.base.meta, split.train_tasks(corpus))
    checkpoints = pretrain_rotation(["ssl_e"], config.base.data, config.base.upstream, config.base.pretrain,
                                    {config.sweep.scenario: [split]}, config.base.models_dir, config.base.storage)
    return space, corpus, split, checkpoints[(config.sweep.scenario, split.test_annotator)]["ssl_e"]


def trial_inputs(config: TuneJobConfig, corpus, split, ssl_e) -> dict:
    """What every trial needs besides its config, read here once and handed to trials through the object
    store: SSL-E's weights, the upstream's checkpoint and the split's input bank (audio or conv features)."""
    from safetensors.torch import load_file

    from distmeta.features import AudioBank, input_bank
    from distmeta.listener.metatrain import training_pool
    from distmeta.models.upstream import Upstream, portable

    audio = AudioBank(corpus, training_pool(split.train_tasks(corpus), split.val_task(corpus)), config.base.pretrain.max_seconds)
    return {"ssl_e": load_file(str(ssl_e)), "upstream_checkpoint": portable(config.base.upstream),
            "inputs": input_bank(Upstream(config.base.upstream), audio)}


def sweep(config: TuneJobConfig, space: dict, parent_run_id: str, icl=None, corpus=None, split=None, ssl_e=None):
    """The Tuner's results; `icl`: (speaker data, frames) for speech-LM trials, else a Meta-PerSER sweep of `split`."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    base, options = config.base, config.sweep
    metric, mode = objective_of(config, icl is not None)
    resources = (tune.PlacementGroupFactory([{"CPU": options.trial_cpus}]) if icl is not None
                 else trial_resources(options.trial_cpus, base.actors, len(split.train_annotators)))
    at_once = concurrent_trials(resources.bundles, options.max_concurrent)
    if at_once < options.max_concurrent:
        print(f"sweep: the cluster holds {at_once} trial(s) at once of sweep.max_concurrent={options.max_concurrent}", flush=True)
    if options.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=options.seed), at_once)
    else:
        searcher = BasicVariantGenerator(random_state=options.seed, max_concurrent=at_once)
    scheduler = (ASHAScheduler(time_attr="step", max_t=steps_of(config, icl is not None), grace_period=options.grace_period,
                               reduction_factor=options.reduction_factor) if options.asha else FIFOScheduler())
    if icl is not None:
        data, frames = icl
        trainable = tune.with_resources(tune.with_parameters(icl_trial, base=cfg.to_dict(config.icl_base), data=data, frames=frames),
                                        resources)
    else:
        trainable = tune.with_resources(
            tune.with_parameters(meta_trial, base=cfg.to_dict(base), corpus=corpus, split=split,
                                 **trial_inputs(config, corpus, split, ssl_e)), resources)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=options.num_samples),
        run_config=tune.RunConfig(
            name="sweep", storage_path=storage_path(base.storage, Path(config.out) / "ray"), verbose=1,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            callbacks=[MLflowLoggerCallback(tracking_uri=tracking.tracking_uri(), experiment_name=config.experiment,
                                            tags={"mlflow.parentRunId": parent_run_id})]))
    return tuner.fit()


def objective_of(config: TuneJobConfig, icl: bool) -> tuple[str, str]:
    """(metric, mode) the search, ASHA and the best trial read: the meta-trainer's model-selection criterion."""
    return SPEECH_LM_OBJECTIVE if icl else selection(config.base.meta.select)


def steps_of(config: TuneJobConfig, icl: bool) -> int:
    """A trial's length on ASHA's axis: outer steps, or the speech LM's stage-2 steps."""
    return config.icl_base.meta.stage2_steps if icl else config.base.meta.outer_steps


def save(config: TuneJobConfig, space: dict, results, icl: bool = False) -> dict:
    out = Path(config.out)
    metric, mode = objective_of(config, icl)
    table = sweep_table(results, space, steps_of(config, icl), metric, mode)
    scored = "the TU+LU speech LM on the validation speakers" if icl else "the validation annotator"
    better = "lower" if mode == "min" else "higher"
    paths = {"sweep": save_table(table, out, "sweep", f"Sweep: {len(table)} trials, {metric} of {scored} "
                                 f"({better} is better), best over the steps each trial ran", ".4g")}
    plot_trials(results, out / "sweep.png", metric)
    paths["plot"] = out / "sweep.png"
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    job_config, base = (MetaICLJobConfig, config.icl_base) if icl else (MetaTrainConfig, config.base)
    best_config = cfg.from_dict(job_config, with_params(cfg.to_dict(base), {k: best.config[k] for k in space}),
                                where="best trial")
    cfg.save(best_config, out / "best_config.yaml")
    paths["best_config"] = out / "best_config.yaml"
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--space" in argv:  # shorthand for sweep.space=FILE
        at = argv.index("--space")
        argv = argv[:at] + argv[at + 2:] + [f"sweep.space={argv[at + 1]}"]
    config = cfg.parse_args(TuneJobConfig, argv, job="tune", description=__doc__.split("\n")[0],
                            epilog="--space FILE  the search space YAML (same as sweep.space=FILE)")
    started = time.time()
    cfg.save(config, Path(config.out) / "config.yaml")
    description = f"Ray Tune sweep over {config.sweep.space}"
    tags = {"path": "sweep", "space": Path(config.sweep.space).stem}
    with tracking.run(config.experiment, f"tune-{Path(config.sweep.space).stem}", asdict(config), description, tags) as mlflow:
        icl = space_job(space_path(config.sweep.space)) == "metaicl_train"
        parent = mlflow.active_run().info.run_id
        if icl:
            space, data, frames = setup_icl(config)
            print(f"sweeping the speech LM's {sorted(space)}: stage 1 + TU+LU per trial, scored on "
                  f"{len(data.splits['valid'])} validation speakers; {config.sweep.num_samples} trials", flush=True)
            results = sweep(config, space, parent, icl=(data, frames))
        else:
            space, corpus, split, ssl_e = setup(config)
            print(f"sweeping {sorted(space)} on {config.sweep.scenario} split {split.test_annotator} "
                  f"(validation annotator {split.val_annotator}); {config.sweep.num_samples} trials", flush=True)
            results = sweep(config, space, parent, corpus=corpus, split=split, ssl_e=ssl_e)
        if len(results.errors) == len(results):
            raise SystemExit(f"every trial failed; the first: {results.errors[0]}")
        paths = save(config, space, results, icl)
        for path in paths.values():
            mlflow.log_artifact(str(path))
        mlflow.log_metric("wall_seconds", time.time() - started)
    print("\n" + Path(paths["sweep"]).read_text())
    print(f"best config: {paths['best_config']}  (python jobs/{'metaicl_train' if icl else 'meta_train'}.py --config {paths['best_config']})")
    print(f"wall time {time.time() - started:.0f}s; written to {Path(config.out).resolve()}")
    if results.errors:
        print(f"{len(results.errors)} of {len(results)} trials failed (the `error` column of sweep.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
