"""The speaker path's default run over several speaker-corpus seeds, and the paper's ordering at each.

    .venv/bin/python benchmarks/bench_speaker_seeds.py --seeds 21,22,23 [--out runs/speaker-seeds] [key=value ...]
    .venv/bin/python benchmarks/bench_speaker_seeds.py --seeds 21,22,23 --summarize    # runs already under --out

Each seed is `jobs/metaicl_train.py data.speakers.seed=S` from its own models folder (so its corpus,
encoder and speech LMs are its own), run one after another with nothing else on the machine. Then, per
seed, from the run's `paired.csv`, `table2.csv` and `timing.csv`:

    room            Oracle-Reader 7 - 0 pairs (and Ceiling-Reader's: what the encoder keeps)
    pairs help      Proposed 7 - 0 pairs, per-speaker 95% interval
    vs Pers_A       Proposed at 7 pairs - Personalized_A
    0 vs Pretrained Proposed at 0 pairs - Pretrained
    MAML            MAML 7 - 0 pairs and MAML at 7 - Personalized_A, for comparison
    A vs N          Personalized_A - Personalized_N
    minutes         the job's wall time

and whether each of the paper's claims holds with its interval (a difference "above" 0 needs its
interval's low end above 0; "at or above" needs its high end above 0), then the means over the seeds.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = {  # column -> paired.md row
    "room": "Oracle-Reader (7 pairs) - Oracle-Reader (0 pairs)",
    "encoder keeps": "Ceiling-Reader (7 pairs) - Ceiling-Reader (0 pairs)",
    "pairs help": "Proposed (7 pairs) - Proposed (0 pairs)",
    "vs Pers_A": "Proposed (7 pairs) - Personalized_A",
    "0 vs Pretrained": "Proposed (0 pairs) - Pretrained",
    "MAML 7-0": "MAML (7 pairs) - MAML (0 pairs)",
    "MAML vs Pers_A": "MAML (7 pairs) - Personalized_A",
    "A vs N": "Personalized_A - Personalized_N",
}


def summarize(out: Path) -> dict:
    paired = pd.read_csv(out / "paired.csv", index_col=0)
    table = pd.read_csv(out / "table2.csv", keep_default_na=False)
    timing = pd.read_csv(out / "timing.csv", index_col=0, keep_default_na=False)["seconds"]
    row = {}
    for name, comparison in COMPARISONS.items():
        if comparison in paired.index:
            p = paired.loc[comparison]
            row[name] = f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"
            row[f"_{name}"] = (p["mean"], p["low"], p["high"])
    ua = lambda model, icl: float(table[(table["model"] == model) & (table["ICL"] == icl)]["UA_spk"].iloc[0])
    row["Pretrained"] = ua("Pretrained", "-")
    proposed = table[table["model"] == "Proposed"]["UA_spk"].astype(float)
    row["Proposed rises over k"] = bool(proposed.iloc[-1] > proposed.iloc[0] and proposed.diff().iloc[1:].mean() > 0)
    row["minutes"] = float(timing["total"]) / 60
    low = lambda name: row[f"_{name}"][1]
    high = lambda name: row[f"_{name}"][2]
    row["holds"] = {"room >= 0.09": row["_room"][0] >= 0.09, "pairs help": low("pairs help") > 0,
                    "above Pers_A": low("vs Pers_A") > 0, "0 pairs at or above Pretrained": high("0 vs Pretrained") > 0,
                    "Pretrained in 0.50-0.70": 0.5 <= row["Pretrained"] <= 0.7, "A above N": row["_A vs N"][0] > 0,
                    "<= 20 minutes": row["minutes"] <= 20}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", required=True, help="speaker-corpus seeds, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/speaker-seeds"))
    parser.add_argument("--summarize", action="store_true", help="only read the runs already under --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the job, the same at every seed")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds if not args.summarize else []:
        out = args.out / f"seed{seed}"
        command = [sys.executable, str(ROOT / "jobs" / "metaicl_train.py"), "--out", str(out), f"data.speakers.seed={seed}",
                   f"models_dir={out / 'models'}", *args.overrides]
        print(f"speaker-corpus seed {seed}: {' '.join(command[1:])}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / f"seed{seed}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    rows = {seed: summarize(args.out / f"seed{seed}") for seed in seeds}
    shown = pd.DataFrame({s: {k: v for k, v in r.items() if not k.startswith("_") and k != "holds"} for s, r in rows.items()}).T
    print("\nper seed (mean difference of per-speaker accuracy [95% interval]):")
    print(shown.to_string())
    print("\nthe paper's claims, per seed:")
    print(pd.DataFrame({s: r["holds"] for s, r in rows.items()}).T.to_string())
    means = {name: sum(r[f"_{name}"][0] for r in rows.values()) / len(rows) for name in COMPARISONS if f"_{name}" in rows[seeds[0]]}
    print("\nmeans over the seeds: " + ", ".join(f"{k} {v:+.3f}" for k, v in means.items())
          + f", minutes {sum(r['minutes'] for r in rows.values()) / len(rows):.1f}")


if __name__ == "__main__":
    main()
