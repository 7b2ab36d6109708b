"""Hyperparameter sweeps with Ray Tune over the meta-trainer (`jobs/tune.py` is the recipe).

A search space is a YAML file under `tune_spaces/`: each key is a config path,
the same as a command-line override (`meta.inner_lr`), each value a
distribution or a constant:

    meta.inner_lr: {loguniform: [1.0e-4, 3.0e-2]}
    meta.shots: {choice: [8, 16, 32]}
    meta.da_first_order_fraction: {uniform: [0.0, 0.6]}
    meta.inner_steps: {randint: [2, 8]}        # 2..7, Python's range convention
    meta.tasks_per_step: 4                     # a constant

A trial is one meta-training of one split (the distributed trainer unless the
base config says `distributed: false`); after every validation it reports the
validation annotator's `val_loss`, `val_maF1`, `val_miF1` and the outer loss.
ASHA and the search read the meta-trainer's own model-selection criterion
(`meta.learner.selection`: `val_maF1`, highest best, under `meta.select: maF1`,
the default; `val_loss`, lowest best, under `meta.select: loss`), so a sweep
ranks trials by what picks the model inside each of them.

A space whose first key is `job: metaicl_train` sweeps the speech LM instead
(its keys are `jobs/metaicl_train.py` config paths): a trial trains stage 1
and then MetaICL (TU+LU) in its own process, and reports the TU+LU model's
validation loss on the validation speakers after each validation.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml

from distmeta import config as cfg

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
SWEPT_JOBS = ("meta_train", "metaicl_train")  # what a space's `job` key may name (default: meta_train)
SPEECH_LM_OBJECTIVE = ("val_loss", "min")  # the speech LM's stage-2 validation loss


@dataclass
class SweepConfig:
    space: str = "tune_spaces/meta_perser.yaml"
    num_samples: int = 8  # trials
    max_concurrent: int = 2  # trials running at once (each also holds its actors' resources)
    search: Literal["random", "optuna"] = "random"
    asha: bool = True  # stop trials whose objective (docs/tuning.md) trails the others' at the same step
    grace_period: int = 10  # outer steps every trial runs before ASHA may stop it
    reduction_factor: int = 2
    trial_cpus: float = 1.0  # the trial's own process (outer loop, validation); its actors come on top
    scenario: str = "unseen"
    test_annotator: str = ""  # the rotation split whose validation annotator scores trials ("" = the first)
    seed: int = 0  # the search's random state
    max_failures: int = 1  # a trial whose process dies starts over (trials take minutes; they keep no checkpoint)


def load_space(path, config_cls) -> dict:
    """Ray Tune domains from a space YAML; every key must be a field of `config_cls` (checked with
    the bounds and the values' types), errors name the file and the key."""
    from ray import tune

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise cfg.ConfigError(f"cannot read search space {path}: {err}") from err
    if not isinstance(raw, dict) or not raw:
        raise cfg.ConfigError(f"{path}: a search space is a mapping of config keys to distributions, got {raw!r}")
    space = {}
    for key, spec in raw.items():
        if key == "job":
            continue  # see space_job
        where = f"{path}: {key}"
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise cfg.ConfigError(f"{where}: give one of {', '.join(DISTRIBUTIONS)} (e.g. {{loguniform: [1e-4, 1e-2]}}), got {spec!r}")
            (kind, args), = spec.items()
            values = _check_args(kind, args, where)
        else:
            kind, values = "constant", [spec]
        defaults = cfg.to_dict(config_cls())
        for value in values:  # type and key checks through the config class itself
            try:
                cfg.from_dict(config_cls, with_params(defaults, {key: value}))
            except cfg.ConfigError as err:
                raise cfg.ConfigError(f"{where}: {err}") from None
        if kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "constant":
            space[key] = values[0]
        else:
            space[key] = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[kind](*values)
    return space


def space_job(path) -> str:
    """The job a space sweeps: its `job` key (meta_train or metaicl_train), meta_train without one."""
    raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    job = raw.get("job", "meta_train") if isinstance(raw, dict) else "meta_train"
    if job not in SWEPT_JOBS:
        raise cfg.ConfigError(f"{path}: job {job!r} cannot be swept; use one of {', '.join(SWEPT_JOBS)}")
    return job


def _check_args(kind: str, args, where: str) -> list:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise cfg.ConfigError(f"{where}: choice needs a non-empty list of values, got {args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise cfg.ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise cfg.ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise cfg.ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise cfg.ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
    return [low, high]


def check_shots(space: dict, meta, tasks) -> None:
    """Fail before any trial starts if the largest K the space can draw exceeds a training task."""
    from ray.tune.search.sample import Categorical, Integer

    shots = space.get("meta.shots", meta.shots)
    largest = max(shots.categories) if isinstance(shots, Categorical) else shots.upper - 1 if isinstance(shots, Integer) else shots
    csmt = space.get("meta.csmt", meta.csmt)
    needed = largest * (1 if csmt is True else 2)  # without CSMT (or when it is swept) K support + K query
    small = [f"{t.annotator} ({len(t)})" for t in tasks if len(t) < needed]
    if small:
        raise cfg.ConfigError(f"the space draws meta.shots up to {largest} ({needed} items per task), but training "
                              f"task(s) {', '.join(small)} have fewer; lower meta.shots in the space")


def with_params(base: dict, params: dict) -> dict:
    """The base config (a plain dict) with a trial's `{"a.b": value}` params applied."""
    merged = base
    for key, value in params.items():
        merged = cfg.merge(merged, cfg.nested(key, value))
    return merged


def trial_resources(trial_cpus: float, actors, n_actors: int):
    """One placement group per trial: a bundle for the trial process, one per task actor (when
    actors reserve anything), so concurrent trials never take each other's CPUs or GPUs."""
    from ray import tune

    actor = {k: v for k, v in (("CPU", actors.num_cpus), ("GPU", actors.num_gpus)) if v > 0}
    return tune.PlacementGroupFactory([{"CPU": trial_cpus}] + ([actor] * n_actors if actor else []), strategy="PACK")


def concurrent_trials(bundles: list[dict], wanted: int) -> int:
    """How many trials of these placement-group `bundles` run at once: at most `wanted`, and what the cluster
    holds. A bundle no node can hold, or a trial larger than the whole cluster, is refused (ValueError naming
    the resource): Tune would leave it pending forever."""
    import math

    import ray

    from distmeta.cluster import placeable

    for bundle in bundles:
        placeable("a Tune trial's bundles (sweep.trial_cpus, actors.num_cpus, actors.num_gpus)", bundle.get("CPU", 0.0),
                  bundle.get("GPU", 0.0))
    total = ray.cluster_resources()
    need = {r: sum(b.get(r, 0.0) for b in bundles) for r in ("CPU", "GPU")}
    holds = min([math.floor(total.get(r, 0.0) / n + 1e-9) for r, n in need.items() if n > 0], default=wanted)
    if holds < 1:
        raise ValueError(f"a Tune trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU in all (the trial and its task "
                         f"actors), but the cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")
    return min(wanted, holds)


def meta_trial(params: dict, *, base: dict, corpus, split, ssl_e: dict, upstream_checkpoint: bytes | None, inputs) -> None:
    """A Ray Tune trainable: meta-train `split` with the base config + `params`, reporting after
    every validation. Task actors started here live in the trial's placement group.

    A trial reads nothing from the driver's disk, so it may run on any node: the corpus table, the
    split's input bank (`inputs`), SSL-E's weights and the upstream's checkpoint come through the object
    store (`tune.with_parameters`)."""
    from ray import tune

    from distmeta.meta.actors import ActorConfig, ActorPool
    from distmeta.meta.learner import MetaConfig
    from distmeta.listener.metatrain import meta_train_split
    from distmeta.models.upstream import UpstreamConfig, landed

    merged = with_params(base, params)
    meta = cfg.from_dict(MetaConfig, merged["meta"], where="trial", prefix="meta.")
    upstream = landed(cfg.from_dict(UpstreamConfig, merged["upstream"], where="trial", prefix="upstream."), upstream_checkpoint)
    actors = ActorPool(cfg.from_dict(ActorConfig, merged["actors"], where="trial", prefix="actors.")) if merged["distributed"] else None

    def report(record: dict) -> None:
        if "val_loss" in record:
            tune.report({k: float(v) for k, v in record.items()})

    try:
        meta_train_split(corpus, split, upstream, ssl_e, meta, merged["pretrain"]["max_seconds"], log=None,
                         actors=actors, on_step=report, inputs=inputs)
    finally:
        if actors is not None:
            actors.shutdown()


def icl_trial(params: dict, *, base: dict, data, frames) -> None:
    """A Ray Tune trainable for the speech LM: stage 1, then MetaICL (TU+LU) from stage 1's best state, in this
    process, with the base config (a `jobs/metaicl_train.py` config) + `params`, as the job's Ray Train loop
    trains them; reports TU+LU's validation loss after each validation (`step`: its stage-2 step). The speaker
    data and the frozen encoder's frames come through the object store."""
    import numpy as np
    import torch
    from ray import tune

    from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig
    from distmeta.speaker.episodes import random_episodes, stage_enrollment
    from distmeta.speaker.metaicl import MetaICLConfig, load_trainable, train_stage

    merged = with_params(base, params)
    meta = cfg.from_dict(MetaICLConfig, merged["meta"], where="trial", prefix="meta.")
    model_config = cfg.from_dict(SpeechLMConfig, merged["model"], where="trial", prefix="model.")
    torch.manual_seed(meta.seed)
    model = SpeechLM(model_config, frames.dim, data.words)
    for training, steps in (("stage1", meta.stage1_steps), ("TU+LU", meta.stage2_steps)):
        setting, shots, emotion = stage_enrollment(training, data.emotions, model_config.max_shots)
        val = random_episodes(data.splits["valid"], meta.val_episodes, setting, shots, np.random.default_rng([meta.seed, 1]),
                              emotion)
        report = (lambda step, metrics, optimizer, best: tune.report(metrics)) if training == "TU+LU" else None
        torch.manual_seed(meta.seed)
        best = train_stage(model, frames, data.splits["train"], val, data.words, steps=steps, setting=setting, shots=shots,
                           emotion=emotion, config=meta, on_validation=report, log=None)
        load_trainable(model, best["state"])


def trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id", Path(result.path).name))


def sweep_table(results, space: dict, outer_steps: int, metric: str = "val_loss", mode: str = "min") -> pd.DataFrame:
    """One row per trial: its params, the best `metric` (and that step's other validation scores), the step,
    steps run, early stop; best trial first."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or metric not in history:
            rows.append({"trial": trial_id(result), **{k: result.config.get(k) for k in space}, "error": str(result.error)})
            continue
        best = history.loc[history[metric].idxmin() if mode == "min" else history[metric].idxmax()]
        steps = int(history["step"].max())
        others = {k: float(best[k]) for k in ("val_loss", "val_maF1", "val_miF1") if k in history and k != metric}
        rows.append({"trial": trial_id(result), **{k: result.config.get(k) for k in space}, f"best {metric}": float(best[metric]),
                     **others, "best step": int(best["step"]), "steps run": steps, "stopped early": steps < outer_steps})
    return pd.DataFrame(rows).sort_values(f"best {metric}", ascending=mode == "min", na_position="last").reset_index(drop=True)


def plot_trials(results, path, metric: str = "val_loss") -> None:
    """`metric` against outer step, one line per trial."""
    from distmeta.report import figure, save_figure

    fig, ax = figure(figsize=(6, 4))
    for result in results:
        history = result.metrics_dataframe
        if history is not None and metric in history:
            ax.plot(history["step"], history[metric], marker=".", label=trial_id(result))
    ax.set_xlabel("step (outer steps; speech LM: stage-2 steps)")
    ax.set_ylabel({"val_loss": "validation loss", "val_maF1": "validation macro-F1"}.get(metric, metric))
    ax.set_title("Sweep trials (ASHA-stopped lines end early)")
    ax.legend(fontsize=7)
    save_figure(fig, path)

