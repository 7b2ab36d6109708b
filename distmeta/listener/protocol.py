"""The meta-test protocol (paper section 3.3) and its tables.

For every scenario, every test annotator of the rotation and every seed: sample
K support and Q query items from that annotator's test pool, let each method
adapt on the support set (one batch, `adapt.steps` steps) and score the queries.
The shots sweep repeats this for each K in `sweep_shots` on the same queries.

Ceiling rows (Entire-All, and on synthetic corpora Oracle-Listener and
Oracle-Aggregate) say how much personalization was possible: Table 1's
"headroom" column is each method's share of the Entire-Zero -> Entire-All gap
on macro-F1, and `paired` compares two methods episode by episode.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distmeta.listener.adapters import AdaptConfig, CeilingConfig, Episode
from distmeta.data.scenarios import Task
from distmeta.metrics import multilabel_scores, t_interval
from distmeta.report import Progress

METRICS = ("maF1", "miF1", "UA")
METHODS = ("Random", "Linear-Few", "Entire-Few", "Entire-Zero", "Multi-Few", "Entire-Sim", "Meta-PerSER")
CEILINGS = ("Entire-All", "Oracle-Aggregate", "Oracle-Listener")  # the oracles: synthetic corpora only
# Whole-model fine-tuning per episode (Entire-All's many epochs most of all; the other methods take well
# under a second): workers.EpisodeWorkers
# hands these out first, so that a split ends on cheap episodes and no actor idles while another finishes one.
SLOWEST_FIRST = ("Entire-All", "Entire-Few", "Meta-PerSER")


def slowness_rank(name: str) -> int:
    """Where `name`'s episodes go in the hand-out order: SLOWEST_FIRST's order, Table 2's `Meta[...]` with
    Meta-PerSER, the rest after them."""
    name = "Meta-PerSER" if name.startswith("Meta[") else name
    return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)


@dataclass
class ProtocolConfig:
    scenarios: tuple[str, ...] = ("seen", "unseen")
    test_annotators: tuple[str, ...] = ()  # () = every annotator who labels all sessions
    seeds: int = 3  # the paper uses 10
    shots: int = 32
    queries: int = 128
    methods: tuple[str, ...] = METHODS + CEILINGS
    sweep_shots: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    # Seeds per test annotator in the shots sweep (0: `seeds`): the sweep table and plot average the first
    # `sweep_seeds` at every K, Table 1's K included. One by default: on 3 seeds the sweep's Meta-PerSER
    # fine-tunings were a quarter of the default run's meta-test (docs/listener.md); `--preset paper` runs all.
    sweep_seeds: int = 1
    sweep_methods: tuple[str, ...] = ("Meta-PerSER", "Linear-Few", "Multi-Few", "Entire-Sim")
    table2: tuple[str, ...] = ("none", "INI", "INI+CSMT", "INI+DA", "INI+LSLR", "INI+CSMT+DA+LSLR")  # on unseen data
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    ceiling: CeilingConfig = field(default_factory=CeilingConfig)
    paired: tuple[str, str] = ("Meta-PerSER", "Entire-Few")  # paired.md: the first minus the second, per episode
    workers: int = 2  # Ray actors scoring episodes in parallel, one CPU each (workers.EpisodeWorkers); 0: in the driver
    worker_gpus: float = 0.0  # GPU share per episode actor (0.25: four on a GPU); its models run there

    @property
    def sweep_seed_count(self) -> int:
        return min(self.sweep_seeds or self.seeds, self.seeds)


def score_episode(adapters: dict, task: Task, config: ProtocolConfig, labels: dict, seed: int, shots: int,
                  name: str) -> dict:
    """One episode: method `name` adapts on `shots` support items drawn with `seed` and is scored on the
    seed's queries; a results row tagged with `labels`. Depends only on its arguments (every adapter seeds
    itself by the episode), so any process computes the same row."""
    support, query = task.sample(shots, config.queries, seed)
    rest = np.setdiff1d(np.arange(len(task)), query)
    episode = Episode(seed, [task.utterances[i] for i in support], task.targets[support],
                      [task.utterances[i] for i in query], [task.utterances[i] for i in rest], task.targets[rest])
    began = time.time()
    probs = adapters[name].predict(episode)
    return {"method": name, **labels, "annotator": task.annotator, "seed": seed, "shots": shots,
            **multilabel_scores(probs, task.targets[query]), "seconds": round(time.time() - began, 3)}


def episode_plan(config: ProtocolConfig, methods: list, pool_size: int) -> list[tuple[int, int, str]]:
    """(seed, shots, method) of every episode of one test task whose pool holds `pool_size` items: Table 1's K
    for every seed and method, then the sweep's other Ks that fit beside the queries, on the sweep's seeds."""
    sweep = [k for k in config.sweep_shots if k != config.shots and k + config.queries <= pool_size]
    plan = [(seed, config.shots, name) for seed in range(config.seeds) for name in methods]
    return plan + [(seed, k, name) for seed in range(config.sweep_seed_count) for k in sweep
                   for name in config.sweep_methods if name in methods]


def run_episodes(adapters: dict, task: Task, config: ProtocolConfig, labels: dict, log=print,
                 workers=None) -> list[dict]:
    """Score every adapter on every seed (and the sweep) for one test task; `labels` tags each row.
    In this process, or on `workers` (Ray actors scoring episodes in parallel; the same rows, in plan order).
    Names mapped to the same adapter object are scored once and their rows copied."""
    methods = [name for name in config.methods if name in adapters]  # the oracles exist only for synthetic corpora
    task.sample(config.shots, config.queries)  # Table 1's K must fit the pool: TooFewItems names the annotator
    left_out = [k for k in config.sweep_shots if k + config.queries > len(task)]
    if left_out and log:  # a small pool cannot hold every sweep K beside the queries; sweep_note says so too
        log(f"  {task.annotator}: shots sweep K={left_out} left out: {len(task)} items in {task.pool}, "
            f"Q={config.queries} of them queries")
    plan = episode_plan(config, methods, len(task))
    # Names that share one adapter object (Meta-PerSER is Table 2's last row when the settings match) score an
    # episode once: the first name's row, copied under the others (their `seconds` 0: they cost nothing).
    first = {}
    scorer = {name: first.setdefault(id(adapters[name]), name) for name in methods}
    scored = list(dict.fromkeys((seed, shots, scorer[name]) for seed, shots, name in plan))
    shown = Progress(f"  {task.annotator}: episode", len(scored), log)

    def progress(done: int) -> None:
        if done % 10 == 0 or done == len(scored):
            shown.update(done)

    if workers is not None:
        rows = workers.run(adapters, task, config, labels, scored, progress)
    else:
        rows = []
        for done, item in enumerate(scored, 1):
            rows.append(score_episode(adapters, task, config, labels, *item))
            progress(done)
    by_episode = dict(zip(scored, rows))
    return [{**by_episode[seed, shots, scorer[name]], "method": name}
            | ({"seconds": 0.0} if scorer[name] != name else {}) for seed, shots, name in plan]


def _mean_ci(values: pd.Series) -> str:
    mean, half = t_interval(100 * values.to_numpy(float))
    return f"{mean:.1f}" if np.isnan(half) else f"{mean:.1f} ± {half:.1f}"


def table1(results: pd.DataFrame, shots: int) -> pd.DataFrame:
    """Paper's Table 1 layout: methods x (scenario, upstream, metric), mean ± 95% CI over annotators x seeds, in %.

    With Entire-Zero and Entire-All present, a "headroom" column per (scenario, upstream): the method's
    share of the personalization headroom on macro-F1, (method - Entire-Zero) / (Entire-All - Entire-Zero), in %.
    """
    main = results[results["shots"] == shots]
    known = METHODS + CEILINGS
    order = [m for m in known if m in set(main["method"])] + sorted(set(main["method"]) - set(known))
    columns = {}
    for (scenario, upstream), group in main.groupby(["scenario", "upstream"], sort=False):
        for metric in METRICS:
            cells = group.groupby("method")[metric].apply(_mean_ci)
            columns[(scenario, upstream, metric)] = [cells.get(m, "") for m in order]
        means = group.groupby("method")["maF1"].mean()
        if {"Entire-Zero", "Entire-All"} <= set(means.index):
            room = means["Entire-All"] - means["Entire-Zero"]
            columns[(scenario, upstream, "headroom")] = [
                f"{100 * (means[m] - means['Entire-Zero']) / room:.0f}" if m in means.index and room > 0 else ""
                for m in order]
    table = pd.DataFrame(columns, index=order)
    table.index.name = "method"
    return table


def paired(results: pd.DataFrame, method: str, reference: str, shots: int) -> pd.DataFrame:
    """`method` minus `reference` on the same episodes (scenario, annotator, seed at `shots`): per scenario
    and metric, the mean difference and its 95% t-interval (in points), episodes, and how many it wins."""
    main = results[results["shots"] == shots]
    keys = ["scenario", "upstream", "annotator", "seed"]
    both = main[main["method"] == method].merge(main[main["method"] == reference], on=keys, suffixes=("", "_ref"))
    rows = []
    for (scenario, upstream), group in both.groupby(["scenario", "upstream"], sort=False):
        for metric in METRICS:
            diff = 100 * (group[metric] - group[f"{metric}_ref"]).to_numpy(float)
            mean, half = t_interval(diff)
            rows.append({"scenario": scenario, "upstream": upstream, "metric": metric, "comparison": f"{method} - {reference}",
                         "mean": round(mean, 2), "low": round(mean - half, 2),
                         "high": round(mean + half, 2), "episodes": len(diff), "wins": int((diff > 0).sum())})
    return pd.DataFrame(rows).set_index(["scenario", "upstream", "metric"]) if rows else pd.DataFrame()


def sweep_table(results: pd.DataFrame, methods) -> pd.DataFrame:
    """Table A4 layout: shots x (scenario, method, metric), means in %."""
    chosen = results[results["method"].isin(list(methods))]
    table = chosen.groupby(["shots", "scenario", "method"])[list(METRICS)].mean().mul(100).unstack(["scenario", "method"])
    return table.reorder_levels([1, 2, 0], axis=1).sort_index(axis=1)


def sweep_note(results: pd.DataFrame, methods, shots: int) -> str:
    """The test annotators a sweep K leaves out (their test pool is too small for K support items beside the
    queries), for the sweep table's title: "" when every K has every annotator of Table 1's K."""
    chosen = results[results["method"].isin(list(methods))]
    everyone = set(map(tuple, chosen[chosen["shots"] == shots][["scenario", "annotator"]].to_numpy()))
    notes = []
    for k, group in chosen.groupby("shots"):
        missing = sorted(everyone - set(map(tuple, group[["scenario", "annotator"]].to_numpy())))
        if missing:
            notes.append(f"K={k} leaves out " + ", ".join(f"{s} {a}" for s, a in missing))
    return f" ({'; '.join(notes)}: too few items in their test pools)" if notes else ""


def plot_sweep(results: pd.DataFrame, methods, path) -> None:
    """Figure 2: one panel per metric, score against shots, a line per method and scenario."""
    from distmeta.report import figure, save_figure

    chosen = results[results["method"].isin(list(methods))]
    means = chosen.groupby(["scenario", "method", "shots"])[list(METRICS)].mean().mul(100)
    fig, axes = figure(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, METRICS):
        for (scenario, method), group in means.groupby(level=[0, 1]):
            shots = group.index.get_level_values("shots")
            ax.plot(shots, group[metric], marker="o", linestyle="-" if scenario == "seen" else "--", label=f"{method} ({scenario})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots K")
        ax.set_title(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def table2(results: pd.DataFrame, variants) -> pd.DataFrame:
    """Paper's Table 2 layout: one row per ablation variant (unseen scenario), component marks, mean ± 95% CI (%)."""
    rows = []
    for variant in variants:
        group = results[(results["method"] == f"Meta[{variant}]") & (results["scenario"] == "unseen")]
        if group.empty:
            continue
        marks = {c: ("✓" if c in variant.split("+") else "") for c in ("INI", "CSMT", "DA", "LSLR")}
        rows.append({"variant": variant, **marks, **{m: _mean_ci(group[m]) for m in METRICS}})
    return pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame()
