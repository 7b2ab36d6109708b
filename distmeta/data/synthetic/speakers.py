"""The many-speaker synthetic corpus (speaker path), in the ICL paper's design.

Many speakers, each reading a fixed number of utterances in each of seven
emotions, split into train / validation / test by speaker. Every speaker also
has a personal way of expressing each emotion (how strongly, and an
idiosyncratic offset of pitch, loudness, tempo, tilt and voice quality), so a
speaker's enrollment utterances carry what a speaker-independent model cannot
know. As a `Corpus`, each utterance has one annotation by the pseudo-annotator
`speaker` (the emotion the speaker was asked to express), `session` 1/2/3 for
train/validation/test and a `split` column (`distmeta.data.speakers.speaker_view`
reads it).
"""

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import soundfile as sf

from distmeta.data.corpus import Corpus, build_annotations
from distmeta.data.speakers import EMOTIONS, SPLITS
from distmeta.data.synthetic.cache import cached_corpus, config_hash, render_all, save_generated
from distmeta.data.synthetic.listeners import CORRELATES
from distmeta.data.synthetic.voice import SAMPLE_RATE, Prosody, Speaker, synthesize
from distmeta.io import atomic_path
from distmeta.labels import CLASSES

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
    out_dir, cached = cached_corpus(out_dir, "speakers", config)
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
