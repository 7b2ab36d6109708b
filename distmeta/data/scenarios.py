"""Scenarios (seen / unseen data), the annotator rotation, and one task per annotator.

Rotation (paper section 3.1, supplementary C): each test annotator is paired
with a fixed validation annotator (the next one in the list, cyclically); every
other annotator trains. By default the test annotators are those who label every
session (IEMOCAP's external evaluators).

- seen:   every pool holds all utterances.
- unseen: training annotators (and SSL-E) use sessions outside `test_sessions`;
          the test annotator is scored on `test_sessions` only; the validation
          annotator is scored on the training sessions, so no test-session
          audio is touched before meta-testing (the paper is silent; our choice).
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np

from distmeta.data.corpus import Corpus
from distmeta.labels import CLASSES

Scenario = Literal["seen", "unseen"]


class TooFewItems(ValueError):
    pass


@dataclass(frozen=True)
class Task:
    """One annotator's labelled items in one pool: what a listener-personalized model adapts to."""

    annotator: str
    pool: str  # human-readable description of where the items come from
    utterances: tuple[str, ...]
    targets: np.ndarray  # [n, C] multi-hot, float32

    def __len__(self) -> int:
        return len(self.utterances)

    def sample(self, k: int, q: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint random indices: `k` support and `q` query items, reproducible for `seed`.

        The query set depends only on (seed, q), so a sweep over k scores every
        shot count on the same queries.
        """
        if k < 1 or q < 0:
            raise ValueError(f"need k >= 1 and q >= 0, got k={k}, q={q}")
        if k + q > len(self):
            raise TooFewItems(
                f"annotator {self.annotator!r} has {len(self)} labelled utterances in {self.pool}; "
                f"K={k} support + Q={q} query = {k + q} needed"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        return order[q:q + k], order[:q]


def make_task(corpus: Corpus, annotator: str, utterances, pool: str) -> Task:
    labels = corpus.labels(annotator, utterances=utterances).sort_index()
    return Task(annotator, pool, tuple(labels.index), labels.to_numpy(np.float32))


@dataclass(frozen=True)
class Split:
    scenario: Scenario
    test_annotator: str
    val_annotator: str
    train_annotators: tuple[str, ...]
    train_sessions: tuple[int, ...]
    test_sessions: tuple[int, ...]

    def _pool(self, corpus: Corpus, sessions) -> tuple[str, ...]:
        utts = corpus.utterances
        return tuple(utts.index[utts["session"].isin(sessions)])

    def train_tasks(self, corpus: Corpus) -> list[Task]:
        pool = self._pool(corpus, self.train_sessions)
        return [make_task(corpus, a, pool, f"sessions {list(self.train_sessions)}") for a in self.train_annotators]

    def val_task(self, corpus: Corpus) -> Task:
        return make_task(corpus, self.val_annotator, self._pool(corpus, self.train_sessions),
                         f"the validation pool (sessions {list(self.train_sessions)})")

    def test_task(self, corpus: Corpus) -> Task:
        return make_task(corpus, self.test_annotator, self._pool(corpus, self.test_sessions),
                         f"the test pool (sessions {list(self.test_sessions)})")

    def aggregated_targets(self, corpus: Corpus):
        """SSL-E's training targets: vote distributions of the training annotators on the training pool."""
        return corpus.aggregated(self.train_annotators, self._pool(corpus, self.train_sessions))


def full_coverage_annotators(corpus: Corpus) -> list[str]:
    """Annotators who label at least one utterance in every session."""
    sessions_of = corpus.annotations.merge(corpus.utterances[["session"]], left_on="utterance", right_index=True)
    covered = sessions_of.groupby("annotator")["session"].nunique()
    return sorted(covered.index[covered == len(corpus.sessions)])


def rotation(corpus: Corpus, scenario: Scenario = "seen", test_annotators=None, test_sessions=(5,)) -> list[Split]:
    """One Split per test annotator, in the paper's rotation."""
    if scenario not in ("seen", "unseen"):
        raise ValueError(f"scenario must be 'seen' or 'unseen', got {scenario!r}")
    tests = list(test_annotators or full_coverage_annotators(corpus))
    unknown = sorted(set(tests) - set(corpus.annotators))
    if unknown:
        raise ValueError(f"test annotators {unknown} not in corpus {corpus.name!r}; annotators: {corpus.annotators}")
    if len(tests) < 2:
        raise ValueError(f"the rotation needs at least 2 test annotators (one tests, one validates), got {tests}")
    if scenario == "seen":
        train_sessions = test_pool = tuple(corpus.sessions)
    else:
        missing = sorted(set(test_sessions) - set(corpus.sessions))
        if missing:
            raise ValueError(f"test sessions {missing} not in corpus {corpus.name!r}; sessions: {corpus.sessions}")
        train_sessions = tuple(s for s in corpus.sessions if s not in test_sessions)
        test_pool = tuple(test_sessions)
    splits = []
    for i, test in enumerate(tests):
        val = tests[(i + 1) % len(tests)]
        train = tuple(a for a in corpus.annotators if a not in (test, val))
        splits.append(Split(scenario, test, val, train, train_sessions, test_pool))
    return splits


__all__ = ["CLASSES", "Scenario", "Split", "Task", "TooFewItems", "full_coverage_annotators", "make_task", "rotation"]
