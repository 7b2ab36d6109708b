"""Speaker personalization data: the many-speaker synthetic corpus and the speaker view of any corpus.

The ICL paper's data: many speakers, each reading a fixed number of utterances
in each of seven emotions (neutral, surprise, sadness, joy, fear, disgust,
anger), split into train / validation / test by speaker. Our synthetic
version keeps that design; every speaker also has a personal way of
expressing each emotion (how strongly, and an idiosyncratic offset of pitch,
loudness, tempo, tilt and voice quality), so a speaker's enrollment
utterances carry what a speaker-independent model cannot know.

As a `Corpus`, each utterance has one annotation by the pseudo-annotator
`speaker` (the emotion the speaker was asked to express), `session` 1/2/3 for
train/validation/test and a `split` column. `speaker_view` reads any corpus
this way: the `split` column if present (else speakers hashed into the three
parts), and one emotion per utterance (the `emotion` column, else the
majority of its annotators' labels).
"""

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from distmeta.data.corpus import Corpus, CorpusError, build_annotations
from distmeta.data.synthetic import CORRELATES, config_hash, default_cache_dir, load_cached, render_all, save_generated
from distmeta.data.voice import SAMPLE_RATE, Prosody, Speaker, synthesize
from distmeta.io import atomic_path
from distmeta.labels import CLASSES

# The paper's seven emotions as our classes, in the paper's instruction order, and the words the LM reads.
EMOTIONS = ("neutral", "surprise", "sad", "happy", "fear", "disgust", "angry")
WORDS = {"neutral": "Neutral", "surprise": "Surprise", "sad": "Sadness", "happy": "Joy", "fear": "Fear",
         "disgust": "Disgust", "angry": "Anger"}
SPLITS = ("train", "valid", "test")
# Spread of a speaker's personal offset per prosody field (about the size of the differences between emotions).
STYLE_SCALE = {"f0_st": 2.0, "f0_range": 0.35, "rate": 0.1, "gain_db": 3.0, "tilt": 0.7, "open_quotient": 0.07,
               "aspiration": 0.04, "jitter": 0.006, "shimmer": 0.02, "creak": 0.15, "rising_end_st": 2.0,
               "formant_shift": 0.03}


@dataclass
class SpeakerCorpusConfig:
    seed: int = 0
    n_speakers: int = 100
    per_emotion: int = 4  # utterances per speaker and emotion (the paper: 50)
    emotions: tuple[str, ...] = EMOTIONS
    split_fractions: tuple[float, ...] = (0.7, 0.1, 0.2)  # train, validation, test speakers
    idiosyncrasy: float = 1.0  # scales every speaker's personal offsets (0: everyone expresses alike)
    min_seconds: float = 1.0
    max_seconds: float = 2.5
    workers: int = 0  # 0: one per CPU core


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


def _style(rng, emotions, idiosyncrasy: float) -> dict:
    """A speaker's personal prosody for each emotion: the canonical correlates scaled, plus an offset."""
    neutral = asdict(Prosody())
    style = {}
    for emotion in emotions:
        gain = rng.uniform(0.4, 1.4)
        values = {}
        for key, base in neutral.items():
            deviation = getattr(CORRELATES[emotion], key) - base
            offset = idiosyncrasy * rng.normal(0, STYLE_SCALE[key]) if emotion != "neutral" else 0.0
            values[key] = base + gain * deviation + offset
        values["rate"] = max(values["rate"], 0.6)
        values["creak"] = float(np.clip(values["creak"], 0, 1))
        for key in ("jitter", "shimmer", "aspiration"):
            values[key] = max(values[key], 0.0)
        style[emotion] = values
    return style


def _render(job) -> float:
    path, speaker, prosody, seconds, seed = job
    rng = np.random.default_rng(seed)
    values = dict(prosody)
    values["f0_st"] += rng.normal(0, 0.7)
    values["gain_db"] += rng.normal(0, 1.0)
    values["rate"] *= rng.uniform(0.94, 1.06)
    wav = synthesize(Speaker(**speaker), Prosody(**values), seconds, rng)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return len(wav) / SAMPLE_RATE


def make_speaker_corpus(out_dir=None, config: SpeakerCorpusConfig | None = None, progress: bool = True) -> Corpus:
    """Generate (or load, when `out_dir` holds the same one) the many-speaker corpus; default folder
    `$DISTMETA_CACHE/speakers-<hash>`."""
    config = config or SpeakerCorpusConfig()
    unknown = [e for e in config.emotions if e not in CLASSES]
    if unknown or len(config.split_fractions) != 3 or config.n_speakers < 3 or config.per_emotion < 1:
        raise ValueError(f"speaker corpus config: emotions must be classes ({unknown} are not), three split fractions, "
                         f"at least 3 speakers and 1 utterance per emotion; got {config}")
    out_dir = Path(out_dir) if out_dir else default_cache_dir() / f"speakers-{config_hash(config)}"
    cached = load_cached(out_dir, config_hash(config))
    if cached is not None:
        return cached
    started = time.time()
    rng = np.random.default_rng(config.seed)
    counts = np.floor(np.asarray(config.split_fractions) / sum(config.split_fractions) * config.n_speakers).astype(int)
    counts[0] += config.n_speakers - counts.sum()  # rounding leftovers train
    split_of = np.repeat(np.arange(3), counts)
    rows, jobs, styles = [], [], {}
    for index in range(config.n_speakers):
        name = f"spk{index:03d}"
        female = rng.random() < 0.5
        voice = Speaker(f0=float(rng.normal(210, 22) if female else rng.normal(118, 14)),
                        vtl=float(rng.normal(1.17, 0.04) if female else rng.normal(1.0, 0.04)),
                        rate=float(rng.uniform(3.8, 5.5)), expressiveness=1.0,
                        breathiness=float(rng.uniform(0.0, 0.15) + (0.05 if female else 0.0)))
        styles[name] = _style(rng, config.emotions, config.idiosyncrasy)
        for emotion in config.emotions:
            for take in range(config.per_emotion):
                utt = f"{name}_{emotion}_{take:02d}"
                path = str((out_dir / "wav" / name / f"{utt}.wav").resolve())
                rows.append({"utterance": utt, "path": path, "speaker": name, "session": int(split_of[index]) + 1,
                             "split": SPLITS[split_of[index]], "emotion": emotion, "sex": "F" if female else "M"})
                jobs.append((path, asdict(voice), styles[name][emotion],
                             float(rng.uniform(config.min_seconds, config.max_seconds)), int(rng.integers(2**63))))
    utterances = pd.DataFrame(rows).set_index("utterance")
    utterances["duration"] = render_all(_render, jobs, config.workers, "speaker corpus" if progress else None, 500, started)
    annotations = build_annotations([(u, "speaker", {e}, e) for u, e in utterances["emotion"].items()])
    info = {"source": "synthetic-speakers", "config": asdict(config), "config_hash": config_hash(config),
            "styles": styles, "generation_seconds": round(time.time() - started, 1)}
    corpus = Corpus(utterances, annotations, name=f"speakers-{config_hash(config)}", info=info).validate(check_audio=False)
    return save_generated(corpus, out_dir)


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
