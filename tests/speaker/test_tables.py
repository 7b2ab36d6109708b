"""Tables II-IV and the paired comparisons, from hand-computable results."""

import numpy as np
import pandas as pd
import pytest

from distmeta.data.speakers import EMOTIONS, SpeakerData
from distmeta.speaker import tables

WORDS = SpeakerData(EMOTIONS).words


def fake_results():
    """Results rows for hand-computable tables: speaker x's accuracy in a condition is given, y's is 1 - it."""
    rows = []

    def add(model, training, setting, emotion, k, accuracy_x):
        for speaker, accuracy in (("x", accuracy_x), ("y", 1 - accuracy_x)):
            for i in range(4):
                rows.append({"model": model, "training": training, "setting": setting, "emotion": emotion, "k": k,
                             "speaker": speaker, "utterance": f"{speaker}{i}", "label": "Joy", "prediction": "Joy",
                             "correct": i < round(accuracy * 4)})
    add("Pretrained", "", "", "", 0, 0.5)
    add("0-shot", "stage1", "", "", 0, 0.75)
    add("Proposed", "TU+LU", "", "", 0, 0.25)
    for k in (1, 2):
        add("Proposed", "TU+LU", "TU+LD", "", k, 0.5)
        add("Proposed", "TU+LU", "TE+LU", "", k, 1.0)
        add("Proposed", "TU+LU", "TU+LO", "neutral", k, 0.25 * k)
        add("Proposed (TO+LD_7)", "TO+LD", "TU+LD", "", k, 0.75)
        add("Proposed (TO+LD_7)", "TO+LD", "TU+LO", "neutral", k, 0.0)
    return pd.DataFrame(rows)


def test_tables_follow_the_results():
    results = fake_results()
    two = tables.table2(results)
    assert list(two.index) == ["Pretrained", "0-shot", "Proposed", "Proposed", "Proposed"]
    assert list(two["ICL"]) == ["-", "-", "0-shot", "1-shot", "2-shot"]
    assert two["UA_spk"].tolist() == pytest.approx([0.5] * 5)  # (a + 1 - a) / 2
    assert two["std"].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0, 0.0])
    assert two["max"].tolist() == pytest.approx([0.5, 0.75, 0.75, 0.5, 0.5])
    three = tables.table3(results, WORDS, EMOTIONS)
    assert list(three.index) == ["1-shot", "2-shot"] and three.loc["1-shot", "TE+LU"] == pytest.approx(0.5)
    assert "TU+LO Neutral" in three.columns and three["TE+LD"].isna().all()
    four = tables.table4(results)
    assert list(four.index) == ["TU+LD / TU+LU", "TU+LO (Neutral) / TU+LU", "TU+LD / TO+LD", "TU+LO (Neutral) / TO+LD"]
    assert list(four.columns) == ["1-shot", "2-shot"]


def test_paired_comparisons_are_per_speaker_differences_with_scipys_interval():
    """Five speakers with known accuracies: Proposed at k=2 (TU+LD, the largest k) minus k=0, and minus
    Pretrained; the other settings (TE+LU) and models absent (MAML, Personalized_A) stay out."""
    from scipy import stats

    rng = np.random.default_rng(0)
    accuracy = {("Pretrained", 0, ""): rng.integers(0, 9, 5), ("Proposed", 0, ""): rng.integers(0, 9, 5),
                ("Proposed", 2, "TU+LD"): rng.integers(0, 9, 5), ("Proposed", 2, "TE+LU"): np.full(5, 8)}
    rows = [{"model": model, "training": "", "setting": setting, "emotion": "", "k": k, "speaker": f"s{j}",
             "utterance": f"s{j}_{i}", "label": "Joy", "prediction": "Joy", "correct": i < hits[j]}
            for (model, k, setting), hits in accuracy.items() for j in range(5) for i in range(8)]
    table = tables.paired(pd.DataFrame(rows))
    assert list(table.index) == ["Proposed (2 pairs) - Proposed (0 pairs)", "Proposed (0 pairs) - Pretrained"]
    for name, (mine, theirs) in zip(table.index, [(("Proposed", 2, "TU+LD"), ("Proposed", 0, "")),
                                                 (("Proposed", 0, ""), ("Pretrained", 0, ""))]):
        diff = (accuracy[mine] - accuracy[theirs]) / 8
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        row = table.loc[name]
        assert row["mean"] == pytest.approx(diff.mean()) and row["speakers"] == 5 and row["gains"] == (diff > 0).sum()
        assert (row["low"], row["high"]) == pytest.approx((low, high))
