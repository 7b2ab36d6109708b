"""Table II's ceiling rows: the Gaussian reader against an independent computation, the learned and the
generator's readers on speakers whose pairs carry what a speaker-independent model cannot know, and the
room they give the tables."""

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from distmeta.speaker import ceilings, tables
from distmeta.speaker.ceilings import GaussianReader


def test_the_reader_is_the_posterior_predictive_of_the_joint_gaussian():
    """Score of emotion e for target x given pairs = log p(x, pairs | x is e) - log p(pairs), from the joint
    Gaussian of all the observations (scipy), up to one constant over e."""
    rng = np.random.default_rng(0)
    E, d = 3, 2
    root = rng.normal(size=(E * d, E * d))
    reader = GaussianReader(rng.normal(size=E * d), root @ root.T + np.eye(E * d), np.diag([0.5, 0.8]), E)
    shots, labels, target = rng.normal(size=(4, d)), np.array([0, 2, 2, 1]), rng.normal(size=d)

    def joint(classes, points):
        pick = np.zeros((len(classes) * d, E * d))
        for i, c in enumerate(classes):
            pick[i * d:(i + 1) * d, c * d:(c + 1) * d] = np.eye(d)
        cov = pick @ reader.cov @ pick.T + np.kron(np.eye(len(classes)), reader.noise)
        return multivariate_normal(pick @ reader.mean, cov).logpdf(np.concatenate(points))

    expected = np.array([joint([*labels, e], [*shots, target]) - joint(list(labels), list(shots)) for e in range(E)])
    scores = reader.scores(target, shots, labels)
    np.testing.assert_allclose(scores - logsumexp(scores), expected - logsumexp(expected), atol=1e-8)
    none = reader.scores(target, np.zeros((0, d)), np.zeros(0, int))
    reference = [multivariate_normal(reader.mean[e * d:(e + 1) * d], reader.cov[e * d:(e + 1) * d, e * d:(e + 1) * d]
                                     + reader.noise).logpdf(target) for e in range(E)]
    np.testing.assert_allclose(none - logsumexp(none), reference - logsumexp(reference), atol=1e-8)


def test_the_learned_reader_gains_from_the_pairs_of_speakers_with_a_voice(toy_speakers):
    """Toy speakers: each utterance is its emotion's direction plus the speaker's offset. Pairs reveal the
    offset, so Ceiling-Reader with every emotion once beats it with none, and knowing everyone beats both."""
    data, bank = toy_speakers
    rows = ceilings.feature_rows(bank, data, seed=0)
    assert set(rows["model"]) == {"Ceiling-Reader", "Ceiling-Speaker"}
    assert (rows.loc[rows["model"] == "Ceiling-Speaker", "k"] == 0).all()
    table = tables.table2(rows)
    reader = table.loc["Ceiling-Reader"].set_index("ICL")["UA_spk"]
    assert list(reader.index) == [f"{k}-shot" for k in range(8)]
    assert reader["7-shot"] > reader["0-shot"] and table.loc["Ceiling-Speaker", "UA_spk"] >= reader["0-shot"]
    assert tables.room(rows) == pytest.approx(reader["7-shot"] - reader["0-shot"])


@pytest.mark.slow
def test_the_generators_oracles_on_a_generated_corpus(speaker_corpus):
    from distmeta.data.speakers import speaker_view

    _, corpus = speaker_corpus
    data = speaker_view(corpus)
    rows = ceilings.oracle_rows(corpus, data, seed=0)
    assert set(rows["model"]) == {"Oracle-Reader", "Oracle-Speaker"}
    n_test = sum(len(t.utterances) for t in data.splits["test"])
    assert (rows.groupby(["model", "k"]).size() == n_test).all()
    table = tables.table2(rows)
    reader = table.loc["Oracle-Reader"].set_index("ICL")["UA_spk"]
    assert reader["7-shot"] >= reader["0-shot"] and table.loc["Oracle-Speaker", "UA_spk"] >= reader["0-shot"]
    assert ceilings.oracle_rows(corpus.__class__(corpus.utterances[["path", "speaker", "session", "duration", "split",
                                                                   "emotion"]], corpus.annotations), data, 0).empty


def test_table2_gives_each_reader_of_pairs_its_share_of_the_room():
    def rows(model, k, correct, setting=""):
        return pd.DataFrame({"model": model, "k": k, "speaker": ["a", "a", "b", "b"], "correct": correct,
                             "setting": setting, "training": ""})

    results = pd.concat([rows("Oracle-Reader", 0, [1, 0, 1, 0]), rows("Oracle-Reader", 7, [1, 1, 1, 1], "TO+LD"),
                         rows("Proposed", 0, [1, 0, 0, 0]), rows("Proposed", 7, [1, 0, 1, 0], "TO+LD"),
                         rows("Pretrained", 0, [0, 0, 1, 0]), rows("Personalized_A", 0, [1, 0, 1, 0])], ignore_index=True)
    assert tables.room(results) == pytest.approx(0.5)
    table = tables.table2(results)
    share = table.set_index("ICL", append=True)["share of room"]
    assert share[("Proposed", "7-shot")] == pytest.approx((0.5 - 0.25) / 0.5)
    assert share[("Personalized_A", "-")] == pytest.approx((0.5 - 0.25) / 0.5)
    assert list(table.index)[-2:] == ["Oracle-Reader", "Oracle-Reader"]  # the ceilings come last
    paired = tables.paired(results)
    assert paired.loc["Proposed (7 pairs) - Proposed (0 pairs)", "share of room"] == pytest.approx(0.5)
    assert paired.loc["Oracle-Reader (7 pairs) - Oracle-Reader (0 pairs)", "share of room"] == pytest.approx(1.0)
