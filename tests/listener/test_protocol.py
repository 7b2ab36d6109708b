"""Table 1's headroom column and the paired comparison, against hand computations on a built results frame."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from distmeta.listener.protocol import paired, table1


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    rows = []
    for method, level in (("Entire-Zero", 0.20), ("Entire-Few", 0.22), ("Meta-PerSER", 0.24), ("Entire-All", 0.30),
                          ("Oracle-Listener", 0.6)):
        for annotator in ("E1", "E2", "E3"):
            for seed in range(4):
                noise = rng.normal(0, 0.01, 3)
                rows.append({"method": method, "scenario": "unseen", "upstream": "tiny", "annotator": annotator,
                             "seed": seed, "shots": 32, "maF1": level + noise[0], "miF1": level + 0.1 + noise[1],
                             "UA": 0.6 + noise[2]})
    return pd.DataFrame(rows)


def test_headroom_is_the_share_of_the_zero_to_all_gap(results):
    table = table1(results, 32)
    means = results.groupby("method")["maF1"].mean()
    room = means["Entire-All"] - means["Entire-Zero"]
    for method in ("Entire-Few", "Meta-PerSER", "Oracle-Listener"):
        expected = 100 * (means[method] - means["Entire-Zero"]) / room
        assert float(table.loc[method, ("unseen", "tiny", "headroom")]) == pytest.approx(expected, abs=0.5)
    assert table.loc["Entire-Zero", ("unseen", "tiny", "headroom")] == "0"
    assert table.loc["Entire-All", ("unseen", "tiny", "headroom")] == "100"
    assert list(table.index)[-3:] == ["Meta-PerSER", "Entire-All", "Oracle-Listener"]  # ceilings after the methods
    no_ceiling = table1(results[results["method"] != "Entire-All"], 32)
    assert "headroom" not in no_ceiling.columns.get_level_values(2)


def test_paired_differences_match_scipy(results):
    table = paired(results, "Meta-PerSER", "Entire-Few", 32)
    a = results[results["method"] == "Meta-PerSER"].set_index(["annotator", "seed"])
    b = results[results["method"] == "Entire-Few"].set_index(["annotator", "seed"])
    for metric in ("maF1", "miF1", "UA"):
        diff = 100 * (a[metric] - b[metric])
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        row = table.loc[("unseen", "tiny", metric)]
        assert row["mean"] == pytest.approx(diff.mean(), abs=0.01)
        assert row["low"] == pytest.approx(low, abs=0.01) and row["high"] == pytest.approx(high, abs=0.01)
        assert row["episodes"] == 12 and row["wins"] == int((diff > 0).sum())
    assert paired(results, "Meta-PerSER", "nobody", 32).empty
