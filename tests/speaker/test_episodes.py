"""MetaICL's episodes: evaluation draws, the stages' enrollment ranges, UA_spk."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from distmeta.data.speakers import EMOTIONS
from distmeta.speaker import episodes


def test_evaluation_episodes_are_reproducible_and_cover_every_target(toy_speakers):
    data, _ = toy_speakers
    tasks = data.splits["test"]
    first = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=0)
    again = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=0)
    other = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=1)
    assert [(e.task.speaker, e.target, e.shots) for e in first] == [(e.task.speaker, e.target, e.shots) for e in again]
    assert [e.shots for e in first] != [e.shots for e in other]
    assert [(e.task.speaker, e.target) for e in first] == [(t.speaker, i) for t in tasks for i in range(len(t.utterances))]
    for e in first:
        assert e.target not in e.shots and len(set(e.task.labels[e.shots])) == 3
        assert e.utterances[-1] == e.task.utterances[e.target] and len(e.utterances) == 4
    with pytest.raises(ValueError, match="speaker 's7'"):  # 7 emotions, the target's excluded: TE+LD has 6 at most
        episodes.evaluation_episodes(tasks, 7, "TE+LD", seed=0)


def test_stage_enrollment_ranges():
    assert episodes.stage_enrollment("TU+LU", EMOTIONS, 7) == ("TU+LU", (0, 7), None)
    assert episodes.stage_enrollment("TO+LD", EMOTIONS, 5) == ("TO+LD", (5, 5), None)
    assert episodes.stage_enrollment("TO+LD", EMOTIONS[:4], 7) == ("TO+LD", (4, 4), None)  # LD: one pair per emotion at most
    assert episodes.stage_enrollment("Neutral", EMOTIONS, 7) == ("TU+LO", (0, 7), 0)
    assert episodes.stage_enrollment("stage1", EMOTIONS, 7)[1] == (0, 0)
    with pytest.raises(ValueError, match="TU\\+LX"):
        episodes.stage_enrollment("TU+LX", EMOTIONS, 7)


def test_ua_spk_is_the_mean_of_per_speaker_accuracies():
    rng = np.random.default_rng(0)
    speakers = pd.Series(np.repeat(["a", "b", "c"], [10, 4, 7]))
    label, prediction = rng.integers(0, 3, 21), rng.integers(0, 3, 21)
    stats = episodes.ua_spk(pd.Series(label == prediction), speakers)
    per_speaker = [accuracy_score(label[speakers == s], prediction[speakers == s]) for s in "abc"]
    assert stats["UA_spk"] == pytest.approx(np.mean(per_speaker))
    assert stats["std"] == pytest.approx(np.std(per_speaker)) and stats["median"] == pytest.approx(np.median(per_speaker))
    assert (stats["max"], stats["min"], stats["speakers"]) == (max(per_speaker), min(per_speaker), 3)
    # not the pooled accuracy (speakers of different sizes)
    assert stats["UA_spk"] != pytest.approx(accuracy_score(label, prediction))
