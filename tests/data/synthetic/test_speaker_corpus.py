"""The speaker corpus's generative story: the prior its oracles read is the distribution it draws from, and
what each utterance was generated from is saved with it."""

from dataclasses import replace

import numpy as np
import pytest

from distmeta.data.speakers import EMOTIONS
from distmeta.data.synthetic import SpeakerCorpusConfig, make_speaker_corpus
from distmeta.data.synthetic.speakers import FIELDS, _prototypes, has_oracle, prototype_prior, reader_prior


@pytest.mark.parametrize("changes", [{}, {"voice": 0.5, "idiosyncrasy": 1.5, "intensity": 1.2, "intensity_spread": 0.1}])
def test_the_oracles_prior_is_the_distribution_speakers_are_drawn_from(changes):
    config = replace(SpeakerCorpusConfig(), **changes)
    draws = np.stack([_prototypes(rng, config).ravel() for rng in [np.random.default_rng(7)] for _ in range(20000)])
    mean, cov = prototype_prior(config, EMOTIONS)
    assert draws.shape[1] == len(EMOTIONS) * len(FIELDS)
    scale = np.sqrt(np.diag(cov))
    assert np.abs(draws.mean(0) - mean).max() < 0.05 * scale.max()
    assert np.abs(np.cov(draws.T) - cov).max() < 0.06 * cov.max()


def test_bad_settings_name_the_config():
    with pytest.raises(ValueError, match="variability > 0"):
        make_speaker_corpus(None, replace(SpeakerCorpusConfig(), variability=0.0))
    with pytest.raises(ValueError, match="include neutral"):
        make_speaker_corpus(None, replace(SpeakerCorpusConfig(), emotions=("angry", "sad")))


@pytest.mark.slow
def test_each_utterance_keeps_what_it_was_generated_from(tmp_path):
    config = SpeakerCorpusConfig(seed=3, n_speakers=6, per_emotion=3, workers=2, min_seconds=0.5, max_seconds=0.8)
    corpus = make_speaker_corpus(tmp_path, config, progress=False)
    assert has_oracle(corpus)
    prior = reader_prior(corpus, EMOTIONS)
    residuals = np.stack([prior["latent"][u] - prior["truth"][s].reshape(len(EMOTIONS), -1)[EMOTIONS.index(e)]
                          for u, s, e in zip(corpus.utterances.index, corpus.utterances["speaker"], corpus.utterances["emotion"])])
    # an utterance varies around its speaker's prototype by `variability` in every field
    assert residuals.std() == pytest.approx(config.variability, rel=0.15) and abs(residuals.mean()) < 0.05
    neutral = np.stack([prior["truth"][s][:len(FIELDS)] for s in prior["truth"]])
    angry = np.stack([prior["truth"][s][EMOTIONS.index("angry") * len(FIELDS):][:len(FIELDS)] for s in prior["truth"]])
    assert (angry[:, FIELDS.index("gain_db")] > neutral[:, FIELDS.index("gain_db")]).mean() >= 5 / 6  # anger is louder
