"""The many-speaker corpus, the speaker view of a corpus, and the enrollment samplers' constraints."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distmeta.data.corpus import Corpus, build_annotations
from distmeta.data.speakers import EMOTIONS, ENROLLMENT, SpeakerTask, sample_enrollment, speaker_view
from distmeta.data.synthetic import SpeakerCorpusConfig, make_speaker_corpus


@pytest.fixture(scope="module")
def speakers(tmp_path_factory):
    config = SpeakerCorpusConfig(seed=1, n_speakers=10, per_emotion=2, workers=2)
    return make_speaker_corpus(tmp_path_factory.mktemp("speakers"), config, progress=False), config


@pytest.mark.slow
def test_corpus_design_and_reload(speakers):
    corpus, config = speakers
    utts = corpus.utterances
    assert len(utts) == 10 * 7 * 2
    assert (utts.groupby(["speaker", "emotion"]).size() == 2).all() and set(utts["emotion"]) == set(EMOTIONS)
    assert utts.groupby("speaker")["split"].nunique().max() == 1  # split by speaker
    assert utts.groupby("split")["speaker"].nunique().to_dict() == {"train": 6, "valid": 1, "test": 3}
    labels = corpus.labels("speaker")
    assert (labels.sum(1) == 1).all()
    assert (labels.idxmax(axis=1) == utts.loc[labels.index, "emotion"]).all()
    assert utts["duration"].between(config.min_seconds, config.max_seconds + 0.5).all()
    folder = Path(utts["path"].iloc[0]).parents[2]  # <corpus>/wav/<speaker>/<utterance>.wav
    again = make_speaker_corpus(folder, config, progress=False)  # the saved one, not a new generation
    assert again.info["generation_seconds"] == corpus.info["generation_seconds"]
    pd.testing.assert_frame_equal(again.utterances, utts, check_dtype=False)


@pytest.mark.slow
def test_speaker_view_of_the_synthetic_corpus(speakers):
    corpus, _ = speakers
    data = speaker_view(corpus)
    assert data.emotions == EMOTIONS and data.words[:3] == ["Neutral", "Surprise", "Sadness"]
    assert [len(data.splits[s]) for s in ("train", "valid", "test")] == [6, 1, 3]
    task = data.splits["test"][0]
    emotions = corpus.utterances.loc[list(task.utterances), "emotion"]
    assert [data.emotions[i] for i in task.labels] == emotions.tolist()


def test_speaker_view_of_a_corpus_without_split_or_emotion_columns():
    utts = pd.DataFrame({"path": "x.wav", "speaker": [f"s{i // 4}" for i in range(40)], "session": 1, "duration": 1.0},
                        index=[f"u{i}" for i in range(40)])
    records = [(u, "a", {"angry"}, "angry") for u in utts.index] + [(u, "b", {"sad"}, "sad") for u in utts.index[:20]] \
        + [(u, "c", {"sad"}, "sad") for u in utts.index[:10]]
    data = speaker_view(Corpus(utts, build_annotations(records)))
    tasks = [t for part in data.splits.values() for t in part]
    assert sorted(t.speaker for t in tasks) == sorted({f"s{i}" for i in range(10)})
    assert data.emotions == ("sad", "angry")
    labels = {u: data.emotions[e] for t in tasks for u, e in zip(t.utterances, t.labels)}
    # u0..u9: sad 2 votes vs angry 1; u10..u19: a tie (the earlier class, angry); the rest angry
    assert all(labels[f"u{i}"] == "sad" for i in range(10)) and all(labels[f"u{i}"] == "angry" for i in range(10, 40))
    again = speaker_view(Corpus(utts, build_annotations(records)))  # speakers hash into the same parts every time
    assert {p: [t.speaker for t in ts] for p, ts in again.splits.items()} == {p: [t.speaker for t in ts] for p, ts in data.splits.items()}


def toy_task(per_emotion=3, n_emotions=7):
    labels = np.repeat(np.arange(n_emotions), per_emotion)
    return SpeakerTask("toy", tuple(f"u{i}" for i in range(len(labels))), labels)


@pytest.mark.parametrize("setting", ENROLLMENT)
def test_enrollment_settings_hold(setting):
    task, rng = toy_task(), np.random.default_rng(0)
    for draw in range(300):
        target = int(rng.integers(len(task.labels)))
        k = int(rng.integers(1, 6 if setting.endswith("LD") or setting == "TU+LO" else 8))
        if setting == "TU+LO":
            k = min(k, 2)  # 3 items per emotion, the target's own emotion has 2 others
        picked = sample_enrollment(task, target, k, setting, rng)
        labels = task.labels[picked]
        mine = task.labels[target]
        assert len(picked) == k and len(set(picked)) == k and target not in picked
        if setting.startswith("TE"):
            assert mine not in labels
        if setting.startswith("TO"):
            assert mine in labels
        if setting.endswith("LD"):
            assert len(set(labels)) == k
        if setting.endswith("LO"):
            assert len(set(labels)) == 1


def test_enrollment_draws_vary_and_errors_name_the_speaker():
    task, rng = toy_task(), np.random.default_rng(0)
    # TU: the target's emotion sometimes appears, sometimes not
    seen = {task.labels[0] in task.labels[sample_enrollment(task, 0, 3, "TU+LD", rng)] for _ in range(200)}
    assert seen == {True, False}
    neutral = [sample_enrollment(task, 5, 2, "TU+LO", rng, emotion=0) for _ in range(20)]
    assert all(set(task.labels[p]) == {0} for p in neutral)
    assert sample_enrollment(task, 0, 0, "TU+LU", rng) == []
    with pytest.raises(ValueError, match="'toy'.*TE\\+LD"):
        sample_enrollment(task, 0, 7, "TE+LD", rng)  # only 6 other emotions
    with pytest.raises(ValueError, match="must be one of"):
        sample_enrollment(task, 0, 1, "XX+LD", rng)


def test_manifests_may_use_the_papers_emotion_words():
    from distmeta.data.speakers import WORDS
    from distmeta.labels import canonical_label

    assert {canonical_label(word): word for word in WORDS.values()} == {e: WORDS[e] for e in EMOTIONS}


def test_bad_split_or_emotion_values_name_the_utterance():
    from distmeta.data.corpus import CorpusError

    utts = pd.DataFrame({"path": "x.wav", "speaker": ["a", "b"], "session": 1, "duration": 1.0, "split": ["train", "dev"]},
                        index=["u0", "u1"])
    corpus = Corpus(utts, build_annotations([("u0", "x", {"sad"}, "sad"), ("u1", "x", {"sad"}, "sad")]))
    with pytest.raises(CorpusError, match="utterance 'u1': split 'dev' is not one of train, valid, test"):
        speaker_view(corpus)
    corpus.utterances["split"] = "train"
    corpus.utterances["emotion"] = ["sad", "grumpy"]
    with pytest.raises(CorpusError, match="utterance 'u1': emotion 'grumpy'"):
        speaker_view(corpus)
