"""The benchmark's conditions at each finished default run (room at least 6 maF1, Meta-PerSER ahead of
Entire-Few unseen on both metrics), and Meta-PerSER's lead across corpus seeds.

    .venv/bin/python benchmarks/bench_corpus_seeds.py RUN [RUN ...] [--out seeds.csv]

RUN: the `out` folder of a finished `jobs/meta_train.py` run (its config.yaml and results.csv), one per
corpus seed. For each run, at the protocol's K:
- the unseen room (Entire-All minus Entire-Zero, maF1);
- Meta-PerSER minus Entire-Few per episode on unseen maF1 and miF1 (mean and 95% interval, as paired.md);
- whether Entire-Zero is above Random on every metric in every scenario;
- whether those conditions hold read as means, and with both intervals above 0.

Then, over the runs, the mean per-seed lead with a 95% t-interval across corpus seeds. That is what holds
on average over corpora, where a single run's verdict also carries its own 15 episodes' noise
(docs/results/listener.md).
"""

import argparse
from pathlib import Path

import pandas as pd

from distmeta import config as cfg
from distmeta.io import write_text
from distmeta.settings import MetaTrainConfig
from distmeta.listener.protocol import METRICS, paired
from distmeta.metrics import t_interval
from distmeta.report import markdown_table

MIN_ROOM = 6.0  # Entire-All - Entire-Zero, unseen maF1 points: enough room to personalize


def seed_row(run: Path) -> dict:
    """The benchmark's figures for one finished run."""
    config = cfg.load(MetaTrainConfig, run / "config.yaml")
    results = pd.read_csv(run / "results.csv")
    shots = config.protocol.shots
    at_k = results[results["shots"] == shots]
    means = at_k.groupby(["scenario", "method"])[list(METRICS)].mean().mul(100)
    unseen = means.loc["unseen"]
    lead = paired(at_k, "Meta-PerSER", "Entire-Few", shots).loc["unseen"].droplevel("upstream")
    row = {"corpus_seed": config.data.seed, "room": unseen.loc["Entire-All", "maF1"] - unseen.loc["Entire-Zero", "maF1"]}
    for metric in ("maF1", "miF1"):
        row.update({f"{metric}_lead": lead.loc[metric, "mean"], f"{metric}_low": lead.loc[metric, "low"],
                    f"{metric}_high": lead.loc[metric, "high"]})
    row["zero_above_random"] = bool(all((means.loc[s].loc["Entire-Zero"] > means.loc[s].loc["Random"]).all()
                                        for s in means.index.unique("scenario")))
    row["holds_as_means"] = bool(row["room"] >= MIN_ROOM and row["maF1_lead"] > 0 and row["miF1_lead"] > 0
                                 and row["zero_above_random"])
    row["holds_with_intervals"] = bool(row["holds_as_means"] and row["maF1_low"] > 0 and row["miF1_low"] > 0)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the per-seed rows as CSV")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "results.csv").is_file()]
    if missing:
        parser.error(f"not a finished jobs/meta_train.py run (no results.csv): {', '.join(missing)}")
    seeds = pd.DataFrame([seed_row(run) for run in args.runs]).set_index("corpus_seed").sort_index()
    print("## The conditions per corpus seed (unseen, points)\n")
    print(markdown_table(seeds.round(2)))
    print(f"\nholds read as means at {int(seeds.holds_as_means.sum())} of {len(seeds)}, "
          f"with both intervals above 0 at {int(seeds.holds_with_intervals.sum())}")
    if len(seeds) > 1:
        for metric in ("maF1", "miF1"):
            mean, half = t_interval(seeds[f"{metric}_lead"].to_numpy(float))
            print(f"across {len(seeds)} corpus seeds, Meta-PerSER minus Entire-Few, {metric}: "
                  f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]")
    if args.out:
        write_text(args.out, seeds.to_csv())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
