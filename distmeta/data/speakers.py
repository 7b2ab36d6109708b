"""Speaker personalization data: the speaker view of any corpus, and enrollment sampling.

The ICL paper's data: many speakers, each reading a fixed number of utterances
in each of seven emotions (neutral, surprise, sadness, joy, fear, disgust,
anger), split into train / validation / test by speaker (our synthetic
version: `distmeta.data.synthetic.speakers`). `speaker_view` reads any corpus
this way: the `split` column if present (else speakers hashed into the three
parts), and one emotion per utterance (the `emotion` column, else the
majority of its annotators' labels).
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distmeta.data.corpus import Corpus, CorpusError
from distmeta.labels import CLASSES

# The paper's seven emotions as our classes, in the paper's instruction order, and the words the LM reads.
EMOTIONS = ("neutral", "surprise", "sad", "happy", "fear", "disgust", "angry")
WORDS = {"neutral": "Neutral", "surprise": "Surprise", "sad": "Sadness", "happy": "Joy", "fear": "Fear",
         "disgust": "Disgust", "angry": "Anger"}
SPLITS = ("train", "valid", "test")
@dataclass
class SpeakerTask:
    """One speaker's utterances and their emotions (indices into `SpeakerData.emotions`)."""

    speaker: str
    utterances: tuple[str, ...]
    labels: np.ndarray

    def by_emotion(self) -> dict[int, np.ndarray]:
        return {int(e): np.flatnonzero(self.labels == e) for e in np.unique(self.labels)}


@dataclass
class SpeakerData:
    emotions: tuple[str, ...]
    splits: dict = field(default_factory=dict)  # split name -> [SpeakerTask]

    @property
    def words(self) -> list[str]:
        return [WORDS.get(e, e.capitalize()) for e in self.emotions]


def _checked(corpus: Corpus, column: str, allowed) -> pd.Series:
    values = corpus.utterances[column].astype(str)
    bad = values[~values.isin(allowed)]
    if len(bad):
        raise CorpusError(corpus.name, [f"utterance {u!r}: {column} {v!r} is not one of {', '.join(allowed)}"
                                        for u, v in bad.head(10).items()])
    return values


def speaker_view(corpus: Corpus, fractions=(0.7, 0.1, 0.2)) -> SpeakerData:
    """Speaker tasks per split: each speaker's utterances with one emotion each."""
    utts = corpus.utterances
    if "emotion" in utts.columns:
        emotion = _checked(corpus, "emotion", CLASSES)
    else:  # the majority of the annotators' labels; ties go to the earlier class
        votes = corpus.annotations.groupby("utterance")[list(CLASSES)].sum()
        emotion = pd.Series(np.asarray(CLASSES)[votes.to_numpy().argmax(1)], index=votes.index).reindex(utts.index)
        emotion = emotion.dropna()
    present = [e for e in EMOTIONS if e in set(emotion)] + sorted(set(emotion) - set(EMOTIONS))
    if "split" in utts.columns:
        split = _checked(corpus, "split", SPLITS)
    else:
        edges = np.cumsum(fractions) / sum(fractions)

        def part(speaker):
            x = int(hashlib.sha256(str(speaker).encode()).hexdigest()[:8], 16) / 16**8
            return SPLITS[int(np.searchsorted(edges, x, side="right"))]
        split = utts["speaker"].map(part)
    index = {e: i for i, e in enumerate(present)}
    data = SpeakerData(tuple(present), {s: [] for s in SPLITS})
    for (part_name, speaker), group in utts.loc[emotion.index].groupby([split.loc[emotion.index], "speaker"], sort=True):
        ids = tuple(sorted(group.index))
        data.splits[part_name].append(SpeakerTask(str(speaker), ids, np.array([index[emotion[u]] for u in ids])))
    return data


ENROLLMENT = ("TU+LU", "TU+LD", "TE+LU", "TE+LD", "TO+LD", "TU+LO")


def sample_enrollment(task: SpeakerTask, target: int, k: int, setting: str, rng: np.random.Generator,
                      emotion: int | None = None) -> list[int]:
    """k enrollment items (indices into the task) for target item `target`, never the target itself.

    TU / TE / TO: the target's emotion may appear / never appears / appears at least once.
    LU / LD / LO: labels unconstrained / all different / all the same (`emotion`, else random;
    the paper's "Neutral" enrollment is TU+LO with `emotion` = neutral).
    Raises ValueError when the speaker cannot satisfy the setting.
    """
    if setting not in ENROLLMENT:
        raise ValueError(f"enrollment setting must be one of {ENROLLMENT}, got {setting!r}")
    if k == 0:
        return []
    pools = {e: idx[idx != target] for e, idx in task.by_emotion().items()}
    pools = {e: p for e, p in pools.items() if len(p)}
    mine = int(task.labels[target])
    target_rule, label_rule = setting.split("+")
    if target_rule == "TE":
        pools.pop(mine, None)

    def fail(why):
        return ValueError(f"speaker {task.speaker!r}: cannot draw {k} enrollment items under {setting} ({why})")

    if label_rule == "LU":
        candidates = np.concatenate(list(pools.values())) if pools else np.array([], int)
        if target_rule == "TO":
            raise fail("TO is only defined with LD")
        if len(candidates) < k:
            raise fail(f"{len(candidates)} candidates")
        return [int(i) for i in rng.choice(candidates, k, replace=False)]
    if label_rule == "LO":
        choices = [emotion] if emotion is not None else [e for e, p in pools.items() if len(p) >= k]
        choices = [e for e in choices if e in pools and len(pools[e]) >= k]
        if not choices:
            raise fail("no emotion with enough items")
        chosen = choices[int(rng.integers(len(choices)))]
        return [int(i) for i in rng.choice(pools[chosen], k, replace=False)]
    # LD: k different emotions, one item each
    emotions = list(pools)
    if len(emotions) < k:
        raise fail(f"{len(emotions)} emotions available")
    if target_rule == "TO":
        if mine not in pools:
            raise fail("no other item of the target's emotion")
        others = [e for e in emotions if e != mine]
        picked = [mine] + [others[i] for i in rng.choice(len(others), k - 1, replace=False)]
    else:
        picked = [emotions[i] for i in rng.choice(len(emotions), k, replace=False)]
    order = rng.permutation(len(picked))
    return [int(rng.choice(pools[picked[i]])) for i in order]
