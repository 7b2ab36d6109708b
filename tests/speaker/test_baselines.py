"""The classifier baselines: reference episodes, and a classifier that learns the toy speakers."""

import numpy as np

from distmeta.data.speakers import EMOTIONS
from distmeta.speaker import baselines, episodes


def test_personalized_baseline_references(toy_speakers):
    data, _ = toy_speakers
    rng = np.random.default_rng(0)
    for episode in baselines.reference_episodes(data.splits["test"], "all", EMOTIONS, rng):
        assert episode.target not in episode.shots
        assert list(episode.task.labels[episode.shots]) == list(range(len(EMOTIONS)))  # one per emotion, in order
    for episode in baselines.reference_episodes(data.splits["test"], "neutral", EMOTIONS, rng):
        assert len(episode.shots) == 1 and episode.task.labels[episode.shots[0]] == 0 and episode.target not in episode.shots


def test_classifier_baseline_beats_chance_on_toy_speakers(toy_speakers):
    data, bank = toy_speakers
    model, _ = baselines.train_classifier("Pretrained", bank, data, baselines.ClassifierConfig(epochs=30, batch_size=16, lr=1e-2),
                                          log=None)
    results = baselines.evaluate_classifier("Pretrained", model, bank, data, seed=0)
    assert len(results) == sum(len(t.utterances) for t in data.splits["test"])
    assert episodes.ua_spk(results["correct"], results["speaker"])["UA_spk"] > 0.6  # chance: 1/7
