"""Table II's ceiling rows: how much k enrollment pairs can tell about a speaker, on the same draws as every model.

    Oracle-Speaker    the generator's Bayes-optimal reader that knows the speaker's prototypes (synthetic speakers)
    Oracle-Reader     the generator's Bayes-optimal reader of k pairs (the posterior over the speaker's prototypes)
    Ceiling-Reader    the same reading learned on the frozen encoder's features, which is what the models see
    Ceiling-Speaker   Ceiling-Reader given every other utterance of the target's speaker

The room on a corpus is Oracle-Reader at the most pairs minus Oracle-Reader at none; Ceiling-Reader's own
difference says how much of it the encoder keeps. Both readers are Bayes rules, not trained models, so
they cost seconds and read exactly the pairs the speech LM reads.

Ceiling-Reader's model, fitted on the training speakers' features (mean-pooled encoder frames, reduced
by PCA and whitened by the within-speaker-and-emotion scatter, so one reading's noise is N(0, I)):

    m[s, e] = M[e] + v[s] + d[s, e]      v ~ N(0, V): the speaker's voice, shared by their emotions
                                         d ~ N(0, B): the speaker's way with one emotion
    utterance = m[s, e] + N(0, I)

Given pairs, the posterior over a speaker's E means is Gaussian (conditioning the stacked [E * dims]
prior on the pairs' counts and sums); a target scores each emotion by its predictive density.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from distmeta.data.speakers import SpeakerTask
from distmeta.data.synthetic.speakers import has_oracle, reader_prior
from distmeta.speaker.episodes import Episode, evaluation_episodes, result_rows, table2_conditions

CEILINGS = ("Oracle-Speaker", "Oracle-Reader", "Ceiling-Speaker", "Ceiling-Reader")
PAIR_READERS = ("Oracle-Reader", "Ceiling-Reader")  # the ceiling rows per k


def pooled_features(bank, utterances) -> np.ndarray:
    """[U, D] the mean of each utterance's frames."""
    return np.stack([bank.items[u].double().mean(0).numpy() for u in utterances])


@dataclass
class GaussianReader:
    """The Bayes rule of a Gaussian speaker model: a speaker's stacked emotion means ~ N(mean, cov) ([E * dims]),
    one utterance ~ N(its emotion's mean, noise). Reads k labelled pairs by conditioning on them."""

    mean: np.ndarray
    cov: np.ndarray
    noise: np.ndarray  # [dims, dims]
    emotions: int

    def __post_init__(self):
        self._inverse_noise = np.linalg.inv(self.noise)
        self._prior_precision = np.linalg.inv(self.cov)
        self._prior_term = self._prior_precision @ self.mean
        self._cache = {}  # pair counts per emotion -> (posterior covariance, per-emotion predictive inverse and log-det)

    def _posterior(self, counts: tuple):
        if counts not in self._cache:
            posterior = np.linalg.inv(self._prior_precision + np.kron(np.diag(counts), self._inverse_noise))
            dims, blocks = len(self.noise), []
            for e in range(self.emotions):
                part = slice(e * dims, (e + 1) * dims)
                predictive = posterior[part, part] + self.noise
                blocks.append((np.linalg.inv(predictive), np.linalg.slogdet(predictive)[1]))
            self._cache[counts] = (posterior, blocks)
        return self._cache[counts]

    def scores(self, target: np.ndarray, shots: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[E] the predictive log-density of `target` under each emotion, given pairs `shots` [k, dims] of `labels`."""
        dims = len(target)
        posterior, blocks = self._posterior(tuple(np.bincount(labels, minlength=self.emotions)))
        sums = np.zeros((self.emotions, dims))
        np.add.at(sums, labels, shots)
        mean = posterior @ (self._prior_term + (sums @ self._inverse_noise).ravel())
        return np.array([-0.5 * (d @ inverse @ d + logdet) for d, (inverse, logdet)
                         in zip(target - mean.reshape(self.emotions, dims), blocks)])

    def predict(self, target: np.ndarray, shots: np.ndarray, labels: np.ndarray) -> int:
        return int(np.argmax(self.scores(target, shots, labels)))


def fit_feature_reader(features: dict, tasks: list[SpeakerTask], emotions: int, dims: int = 32):
    """Ceiling-Reader from the training speakers' features (`features`: utterance -> [D]): (project, reader),
    `project` mapping a feature [D] into the reader's whitened space [dims]."""
    ids = [u for t in tasks for u in t.utterances]
    labels = np.concatenate([t.labels for t in tasks])
    speakers = np.concatenate([[i] * len(t.utterances) for i, t in enumerate(tasks)])
    x = np.stack([features[u] for u in ids])
    dims = min(dims, x.shape[1])
    centre = x.mean(0)
    _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
    z = (x - centre) @ vt[:dims].T
    cells = pd.DataFrame(z).groupby([speakers, labels])
    within = np.cov((z - cells.transform("mean").to_numpy()).T, bias=True) * len(z) / max(len(z) - cells.ngroups, 1)
    basis = vt[:dims].T @ np.linalg.cholesky(np.linalg.inv(within))  # within-cell scatter -> I
    z = (x - centre) @ basis
    means, counts = np.zeros((len(tasks), emotions, dims)), np.zeros((len(tasks), emotions))
    np.add.at(means, (speakers, labels), z)
    np.add.at(counts, (speakers, labels), 1)
    complete = (counts > 0).all(1)  # speakers with every emotion
    means, counts = means[complete] / counts[complete][..., None], counts[complete]
    grand = means.mean(0)  # [E, dims]
    voice = (means - grand).mean(1)  # [S, dims]
    residual = means - grand - voice[:, None]
    noise = (1 / counts).mean()  # a cell mean's own noise, per dimension
    V = _positive(np.cov(voice.T, bias=True) - noise / emotions * np.eye(dims))
    B = _positive(np.cov(residual.reshape(-1, dims).T, bias=True) * emotions / max(emotions - 1, 1) - noise * np.eye(dims))
    cov = np.kron(np.ones((emotions, emotions)), V) + np.kron(np.eye(emotions), B) + 1e-6 * np.eye(emotions * dims)
    return (lambda f: (f - centre) @ basis), GaussianReader(grand.ravel(), cov, np.eye(dims), emotions)


def _positive(matrix: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """The nearest symmetric matrix with eigenvalues >= floor (a covariance estimated as a difference)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.maximum(values, floor)) @ vectors.T


def _everyone_else(tasks: list[SpeakerTask]) -> list[Episode]:
    """Every utterance as a target with every other utterance of its speaker as pairs."""
    return [Episode(t, i, [j for j in range(len(t.utterances)) if j != i]) for t in tasks for i in range(len(t.utterances))]


def _rows(episodes: list[Episode], predict, data, model: str, setting: str) -> pd.DataFrame:
    """Result rows of `predict(target id, pair ids, pair labels) -> emotion index` on `episodes`."""
    predictions = [data.words[predict(e.task.utterances[e.target], [e.task.utterances[i] for i in e.shots],
                                      np.asarray(e.task.labels[e.shots], int))] for e in episodes]
    return result_rows(episodes, predictions, data.words, model=model, training="", setting=setting, emotion="")


def _reader_rows(reader: GaussianReader, space: dict, data, seed: int, model: str) -> list[pd.DataFrame]:
    """`reader` at Table II's k on the evaluation draws of `seed` (`space`: utterance -> its point)."""
    dims = len(reader.noise)
    read = lambda target, pairs, labels: reader.predict(space[target], np.array([space[u] for u in pairs]).reshape(-1, dims), labels)
    return [_rows(evaluation_episodes(data.splits["test"], k, setting or "TU+LU", seed), read, data, model, setting)
            for setting, k in table2_conditions(len(data.emotions))]


def feature_rows(bank, data, seed: int) -> pd.DataFrame:
    """Ceiling-Reader at Table II's k on the evaluation draws of `seed`, and Ceiling-Speaker (every other
    utterance of the target's speaker read as pairs)."""
    tasks = data.splits["train"] + data.splits["test"]
    ids = [u for t in tasks for u in t.utterances]
    project, reader = fit_feature_reader(dict(zip(ids, pooled_features(bank, ids))), data.splits["train"], len(data.emotions))
    space = dict(zip(ids, project(pooled_features(bank, ids))))
    parts = _reader_rows(reader, space, data, seed, "Ceiling-Reader")
    everyone = [Episode(t, i, [j for j in range(len(t.utterances)) if j != i]) for t in data.splits["test"]
                for i in range(len(t.utterances))]
    parts.append(_rows(everyone, lambda target, pairs, labels: reader.predict(
        space[target], np.array([space[u] for u in pairs]), labels), data, "Ceiling-Speaker", ""))
    return _speaker_rows(pd.concat(parts, ignore_index=True))


def oracle_rows(corpus, data, seed: int) -> pd.DataFrame:
    """Oracle-Reader at Table II's k on the evaluation draws of `seed`, and Oracle-Speaker; empty for a corpus
    without the generator's ground truth (a real one)."""
    if not has_oracle(corpus):
        return pd.DataFrame()
    prior = reader_prior(corpus, data.emotions)
    reader = GaussianReader(prior["mean"], prior["cov"], prior["noise"], len(data.emotions))
    parts = _reader_rows(reader, prior["latent"], data, seed, "Oracle-Reader")
    dims = len(prior["noise"])

    def knows(target, pairs, labels):
        truth = prior["truth"][corpus.utterances.at[target, "speaker"]].reshape(-1, dims)
        return int(np.argmax(-((prior["latent"][target] - truth) ** 2).sum(1)))  # isotropic noise: the nearest prototype

    everyone = [Episode(t, i, []) for t in data.splits["test"] for i in range(len(t.utterances))]
    parts.append(_rows(everyone, knows, data, "Oracle-Speaker", ""))
    return _speaker_rows(pd.concat(parts, ignore_index=True))


def _speaker_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The speaker-knowing rows count as no pairs in the tables (k 0), like the classifiers."""
    rows.loc[rows["model"].str.endswith("-Speaker"), "k"] = 0
    return rows
