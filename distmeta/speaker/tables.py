"""The ICL paper's Tables II-IV, the per-speaker paired comparisons behind its claims, and the shots plot,
from the rows of every prediction.
"""

from pathlib import Path

import pandas as pd

from distmeta.io import atomic_path
from distmeta.metrics import t_interval
from distmeta.report import figure, save_figure, save_table
from distmeta.speaker.baselines import CLASSIFIERS
from distmeta.speaker.ceilings import CEILINGS, PAIR_READERS
from distmeta.speaker.episodes import speaker_accuracies, ua_spk


def _stats(results: pd.DataFrame) -> pd.Series:
    return pd.Series(ua_spk(results["correct"], results["speaker"]))


def _by_k(results: pd.DataFrame) -> pd.Series:
    """UA_spk per number of enrollment pairs."""
    return pd.Series({k: _stats(part)["UA_spk"] for k, part in results.groupby("k")}, dtype=float)


def _per_k(results: pd.DataFrame, model: str) -> pd.DataFrame:
    """`model`'s rows in Table II's settings per k: no pairs, TU+LD at 1..E-1, TO+LD at k = E."""
    return results[(results["model"] == model) & results["setting"].fillna("").isin(["", "TU+LD", "TO+LD"])]


def room(results: pd.DataFrame) -> float | None:
    """The room to personalize on these test speakers: the generator's Oracle-Reader with the most pairs minus
    with none (on a corpus without the generator's ground truth, the learned Ceiling-Reader's); None without them."""
    for model in ("Oracle-Reader", "Ceiling-Reader"):
        curve = _by_k(_per_k(results, model))
        if len(curve) > 1:
            return float(curve.iloc[-1] - curve.iloc[0])
    return None


def table2(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table II: classifier baselines, 0-shot and 1-shot_N speech LMs, the proposed model at k = 0..E;
    then MAML (gradient-based) at k = 0..E on the same enrollment pairs (its "ICL" column: the pairs it adapted on);
    then the ceiling rows (`speaker/ceilings.py`). With a room (`room`), "share of room" is what each reader of
    pairs gains over itself without pairs (the personalized classifiers: over Pretrained), as a share of it."""
    rows, zero = [], {}
    for name in [*CLASSIFIERS, "0-shot", "1-shot_N", "Oracle-Speaker", "Ceiling-Speaker"]:
        part = results[results["model"] == name]
        if len(part):
            rows.append({"model": name, "ICL": f"{part['k'].iloc[0]}-shot" if name == "1-shot_N" else "-",
                         "setting": "Neutral" if name == "1-shot_N" else "-", **_stats(part)})
            zero[name] = rows[-1]["UA_spk"]
    for name in ("Proposed", "MAML", *PAIR_READERS):
        for k, part in _per_k(results, name).groupby("k"):
            rows.append({"model": name, "ICL": f"{k}-shot", "setting": part["setting"].iloc[0] or "-", **_stats(part)})
            zero.setdefault(name, rows[-1]["UA_spk"])
    table = pd.DataFrame(rows).astype({"speakers": int}).set_index("model")
    space = room(results)
    if space:
        reference = [zero.get("Pretrained") if name.startswith("Personalized") else
                     zero.get(name) if name in ("Proposed", "MAML", *PAIR_READERS) else None for name in table.index]
        table["share of room"] = [(ua - ref) / space if ref is not None else float("nan")
                                  for ua, ref in zip(table["UA_spk"], reference)]
    order = [n for n in table.index.unique() if n not in CEILINGS] + [n for n in CEILINGS if n in table.index]
    return table.loc[order]


def per_speaker(results: pd.DataFrame, model: str, k: int | None = None) -> pd.Series:
    """Each speaker's accuracy for `model` (at `k` pairs in Table II's settings: TU+LD, TO+LD at k = E)."""
    if k is None:
        part = results[results["model"] == model]
    else:
        part = _per_k(results, model)
        part = part[part["k"] == k]
    return speaker_accuracies(part["correct"], part["speaker"])


def _named(model: str, k: int | None) -> str:
    return model if k is None else f"{model} ({k} pairs)"


def paired(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims as per-speaker paired comparisons on the test speakers: the pairs help (Proposed and
    MAML at k = E minus k = 0), the speech LM reads speech at 0 pairs (Proposed at 0 minus Pretrained), and
    personalization beats the best personalized classifier (k = E minus Personalized_A), enrollment of every
    emotion beats a neutral one (Personalized_A minus Personalized_N); and the ceiling readers' own gain from
    the pairs. Per comparison: the mean difference of per-speaker accuracies, its 95% t-interval, speakers, how
    many speakers gain, and for a reader's k = E minus k = 0 its share of the room (`room`)."""
    top = int(results["k"].max())
    space = room(results)
    comparisons = [(("Proposed", top), ("Proposed", 0)), (("MAML", top), ("MAML", 0)),
                   (("Proposed", 0), ("Pretrained", None)), (("Proposed", top), ("Personalized_A", None)),
                   (("MAML", top), ("Personalized_A", None)), (("Personalized_A", None), ("Personalized_N", None)),
                   *[((name, top), (name, 0)) for name in PAIR_READERS]]
    rows = []
    for (model, k), (reference, k_ref) in comparisons:
        mine, theirs = per_speaker(results, model, k), per_speaker(results, reference, k_ref)
        diff = (mine - theirs).dropna()  # the speakers both were scored on
        if diff.empty:
            continue
        mean, half = t_interval(diff)
        rows.append({"comparison": f"{_named(model, k)} - {_named(reference, k_ref)}", "mean": mean, "low": mean - half,
                     "high": mean + half, "speakers": len(diff), "gains": int((diff > 0).sum()),
                     "share of room": mean / space if space and model == reference else float("nan")})
    return pd.DataFrame(rows).set_index("comparison") if rows else pd.DataFrame()


def table3(results: pd.DataFrame, words, emotions) -> pd.DataFrame:
    """The paper's Table III: UA_spk of the proposed model per enrollment setting (TU+LO per emotion) and k."""
    proposed = results[(results["model"] == "Proposed") & (results["k"] > 0)]
    columns = {}
    for setting in ("TU+LD", "TU+LU", "TE+LD", "TE+LU"):
        part = proposed[proposed["setting"] == setting]
        columns[setting] = _by_k(part)
    for emotion, word in zip(emotions, words):
        part = proposed[(proposed["setting"] == "TU+LO") & (proposed["emotion"] == emotion)]
        if len(part):
            columns[f"TU+LO {word}"] = _by_k(part)
    table = pd.DataFrame(columns)
    table.index = [f"{k}-shot" for k in table.index]
    table.index.name = "ICL"
    return table


def table4(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table IV: test setting TU+LD (TO+LD at k = E) and neutral TU+LO, per training setting and k."""
    rows = {}
    for training in ("TU+LU", "TO+LD", "Neutral"):
        part = results[(results["training"] == training) & (results["k"] > 0)]
        if not len(part):
            continue
        ld = part[part["setting"].isin(["TU+LD", "TO+LD"])]
        lo = part[(part["setting"] == "TU+LO") & (part["emotion"] == "neutral")]
        rows[("TU+LD", training)] = _by_k(ld)
        rows[("TU+LO (Neutral)", training)] = _by_k(lo)
    table = pd.DataFrame(rows).T
    table.columns = [f"{k}-shot" for k in table.columns]
    table.index = [f"{test} / {training}" for test, training in table.index]
    table.index.name = "test setting / training setting"
    return table


def plot_shots(results: pd.DataFrame, path) -> None:
    """UA_spk of the proposed model against the number of enrollment pairs, one line per test setting; MAML and
    the ceiling readers on Table II's pairs."""
    proposed = results[results["model"] == "Proposed"]
    zero = _stats(proposed[proposed["k"] == 0])["UA_spk"] if (proposed["k"] == 0).any() else None
    fig, ax = figure(figsize=(6, 4))
    for setting in ("TU+LD", "TU+LU", "TE+LD", "TE+LU", "TU+LO"):
        part = proposed[proposed["setting"].isin([setting] + (["TO+LD"] if setting == "TU+LD" else []))]
        if len(part):
            curve = _by_k(part)
            if zero is not None:
                curve = pd.concat([pd.Series({0: zero}), curve])
            ax.plot(curve.index, curve.to_numpy(), marker="o", label=setting + (" (TO+LD at every emotion)" if setting == "TU+LD" else ""))
    maml = results[results["model"] == "MAML"]
    if len(maml):  # gradient-based personalization on the same pairs
        curve = _by_k(maml)
        ax.plot(curve.index, curve.to_numpy(), marker="s", linestyle="--", color="black", label="MAML (TU+LD, TO+LD at every emotion)")
    for name, color in zip(PAIR_READERS, ("grey", "silver")):  # what the pairs can tell (speaker/ceilings.py)
        curve = _by_k(_per_k(results, name))
        if len(curve):
            ax.plot(curve.index, curve.to_numpy(), marker=".", linestyle=":", color=color, label=f"{name} (same pairs)")
    ax.set_xlabel("enrollment pairs k")
    ax.set_ylabel("UA_spk")
    ax.set_title("Personalization on the test speakers: ICL, MAML and the ceilings")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_results(results: pd.DataFrame, data, out_dir) -> dict:
    """results.csv and the tables (.md, .csv) and shots.png under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    paths = {"results": out_dir / "results.csv",
             "table2": save_table(table2(results), out_dir, "table2", "Table II: UA_spk on the test speakers", ".3f"),
             "table3": save_table(table3(results, data.words, data.emotions), out_dir, "table3",
                                  "Table III: UA_spk of ICL-based inference per enrollment setting", ".3f")}
    comparison = paired(results)
    if not comparison.empty:
        paths["paired"] = save_table(comparison, out_dir, "paired", "Per-speaker paired comparisons on the test "
                                     "speakers: mean difference of per-speaker accuracy, 95% t-interval, speakers that gain",
                                     ".3f")
    if results["training"].isin(["TO+LD", "Neutral"]).any():
        paths["table4"] = save_table(table4(results), out_dir, "table4",
                                     "Table IV: UA_spk per training setting (MetaICL) and test setting", ".3f")
    plot_shots(results, out_dir / "shots.png")
    paths["shots"] = out_dir / "shots.png"
    return paths
