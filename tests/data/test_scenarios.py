import numpy as np
import pytest

from distmeta.data import TooFewItems, rotation
from distmeta.labels import CLASSES


def test_seen_rotation_pairs_each_test_annotator_with_the_next(small_corpus):
    splits = rotation(small_corpus, "seen")
    assert [(s.test_annotator, s.val_annotator) for s in splits] == [
        ("E1", "E2"), ("E2", "E3"), ("E3", "E4"), ("E4", "E5"), ("E5", "E1")]
    for split in splits:
        assert {split.test_annotator, split.val_annotator}.isdisjoint(split.train_annotators)
        assert len(split.train_annotators) == 9
        assert len(split.test_task(small_corpus)) == len(small_corpus.labels(split.test_annotator))


def test_unseen_keeps_session_five_out_of_training(small_corpus):
    split = rotation(small_corpus, "unseen")[0]
    session = small_corpus.utterances["session"]
    train_utts = {u for t in split.train_tasks(small_corpus) for u in t.utterances}
    test_utts = set(split.test_task(small_corpus).utterances)
    assert set(session[list(train_utts)]) == {1, 2, 3, 4}
    assert set(session[list(test_utts)]) == {5}
    assert set(session[list(split.val_task(small_corpus).utterances)]) <= {1, 2, 3, 4}
    assert set(split.aggregated_targets(small_corpus).index) <= train_utts


def test_task_targets_are_that_annotators_labels(small_corpus):
    task = rotation(small_corpus, "seen")[0].test_task(small_corpus)
    ann = small_corpus.annotations.set_index(["utterance", "annotator"])
    for i in (0, 7, len(task) - 1):
        assert np.array_equal(task.targets[i], ann.loc[(task.utterances[i], "E1"), list(CLASSES)].to_numpy())


def test_aggregated_targets_are_vote_shares(small_corpus):
    split = rotation(small_corpus, "seen")[0]
    agg = split.aggregated_targets(small_corpus)
    utt = agg.index[0]
    rows = small_corpus.annotations.query("utterance == @utt and annotator in @split.train_annotators")
    votes = rows[list(CLASSES)].sum().to_numpy(float)
    assert np.allclose(agg.loc[utt].to_numpy(), votes / votes.sum())


def test_sampler_is_seeded_disjoint_and_fails_clearly(small_corpus):
    task = rotation(small_corpus, "seen")[0].test_task(small_corpus)
    s1, q1 = task.sample(8, 16, seed=4)
    s2, q2 = task.sample(8, 16, seed=4)
    assert np.array_equal(s1, s2) and np.array_equal(q1, q2)
    assert len(s1) == 8 and len(q1) == 16 and not set(s1) & set(q1)
    assert not np.array_equal(task.sample(8, 16, seed=5)[0], s1)
    with pytest.raises(TooFewItems, match=rf"'E1' has {len(task)} labelled utterances in .*K=32 support \+ Q=10000"):
        task.sample(32, 10_000)


def test_rotation_rejects_unknown_annotators(small_corpus):
    with pytest.raises(ValueError, match="'nobody'"):
        rotation(small_corpus, "seen", test_annotators=["E1", "nobody"])
