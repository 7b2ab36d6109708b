"""The many-speaker synthetic corpus (speaker path), in the ICL paper's design, and its oracles.

Many speakers, each reading a fixed number of utterances in each of seven
emotions, split into train / validation / test by speaker. The generative story
lives in the voice-parameter space of `voice.Prosody`, each field measured in
units of `STYLE_SCALE` (about the size of the differences between emotions),
relative to the average voice of the speaker's sex:

    speaker s         voice      w[s] ~ N(0, voice^2)              their pitch, tempo, breathiness, vocal tract, ...
    s's emotion e     prototype  mu[s, e] = g[s, e] * canonical[e] + o[s, e]
                                 g ~ N(intensity, intensity_spread^2)   how strongly s expresses e
                                 o ~ N(0, idiosyncrasy^2)               s's personal way with e (none for neutral)
    one utterance     x = w[s] + mu[s, e] + N(0, variability^2)          how one reading varies

`x` is saved per utterance (`prosody_<field>` columns, before the renderer clips
it to what a voice can do) and `w + mu` per speaker (`info["styles"]`); every
draw is Gaussian given the speaker's sex (which any one utterance reveals), so
the generator's own Bayes-optimal readers are exact (`reader_prior`, read by
`speaker/ceilings.py`): Oracle-Speaker knows the target speaker's prototypes;
Oracle-Reader knows only the distribution above and reads k enrollment pairs.
Their difference from 0 to k pairs is the room any reader of k pairs has on
this corpus. The audio adds what `voice.synthesize` draws (syllables, accents,
vowels), which no oracle sees.

As a `Corpus`, each utterance has one annotation by the pseudo-annotator
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

# One unit of each prosody field: about the size of the differences between emotions.
STYLE_SCALE = {"f0_st": 2.0, "f0_range": 0.35, "rate": 0.1, "gain_db": 3.0, "tilt": 0.7, "open_quotient": 0.07,
               "aspiration": 0.04, "jitter": 0.006, "shimmer": 0.02, "creak": 0.15, "rising_end_st": 2.0,
               "formant_shift": 0.03}
FIELDS = tuple(STYLE_SCALE)


@dataclass
class SpeakerCorpusConfig:
    seed: int = 0
    n_speakers: int = 200
    per_emotion: int = 4  # utterances per speaker and emotion (the paper: 50)
    emotions: tuple[str, ...] = EMOTIONS
    # train, validation, test speakers: enough test speakers that a 0.03 paired difference is resolvable
    split_fractions: tuple[float, ...] = (0.6, 0.1, 0.3)
    # The spreads below are in STYLE_SCALE units (the size of the differences between emotions).
    voice: float = 0.75  # of a speaker's voice around their sex's average
    idiosyncrasy: float = 1.0  # of a speaker's personal offset per emotion (0: everyone expresses alike)
    variability: float = 0.35  # of one utterance around its speaker's prototype
    intensity: float = 0.9  # how strongly speakers express an emotion on average (1: the canonical correlates)
    intensity_spread: float = 0.3  # and how much that differs between speakers and emotions
    min_seconds: float = 1.0
    max_seconds: float = 2.5
    workers: int = 0  # 0: one per CPU core


# The average voice of each sex; a speaker's own voice is this moved by w[s] in the prosody fields.
VOICES = {"F": Speaker(f0=210.0, vtl=1.17, rate=4.65, expressiveness=1.0, breathiness=0.12),
          "M": Speaker(f0=118.0, vtl=1.0, rate=4.65, expressiveness=1.0, breathiness=0.07)}


def _canonical(emotions) -> np.ndarray:
    """[E, P] each emotion's canonical deviation from the neutral voice, in STYLE_SCALE units."""
    return np.array([[(getattr(CORRELATES[e], f) - getattr(Prosody(), f)) / STYLE_SCALE[f] for f in FIELDS] for e in emotions])


def _prototypes(rng, config: SpeakerCorpusConfig) -> np.ndarray:
    """[E, P] one speaker's voice plus their prototype of each emotion, in STYLE_SCALE units."""
    emotions = config.emotions
    voice = config.voice * rng.normal(size=len(FIELDS))
    gains = config.intensity + config.intensity_spread * rng.normal(size=len(emotions))
    offsets = config.idiosyncrasy * rng.normal(size=(len(emotions), len(FIELDS)))
    offsets[[e == "neutral" for e in emotions]] = 0.0
    return voice + gains[:, None] * _canonical(emotions) + offsets


def _prosody(standardised: np.ndarray) -> dict:
    """Prosody field values of a point in STYLE_SCALE units, clipped to what the voice renders."""
    values = {f: float(getattr(Prosody(), f) + x * STYLE_SCALE[f]) for f, x in zip(FIELDS, standardised)}
    values["rate"] = max(values["rate"], 0.5)
    values["creak"] = float(np.clip(values["creak"], 0, 1))
    for key in ("jitter", "shimmer", "aspiration"):
        values[key] = max(values[key], 0.0)
    return values


def _render(job) -> float:
    path, speaker, prosody, seconds, seed = job
    wav = synthesize(Speaker(**speaker), Prosody(**prosody), seconds, np.random.default_rng(seed))
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return len(wav) / SAMPLE_RATE


def make_speaker_corpus(out_dir=None, config: SpeakerCorpusConfig | None = None, progress: bool = True) -> Corpus:
    """Generate (or load, when `out_dir` holds the same one) the many-speaker corpus; default folder
    `$DISTMETA_CACHE/speakers-<hash>`."""
    config = config or SpeakerCorpusConfig()
    unknown = [e for e in config.emotions if e not in CLASSES]
    if (unknown or len(config.split_fractions) != 3 or config.n_speakers < 3 or config.per_emotion < 1
            or "neutral" not in config.emotions or min(config.voice, config.idiosyncrasy, config.intensity_spread) < 0
            or config.variability <= 0):
        raise ValueError(f"speaker corpus config: emotions must be classes ({unknown} are not) and include neutral, "
                         f"three split fractions, at least 3 speakers and 1 utterance per emotion, spreads >= 0 and a "
                         f"variability > 0; got {config}")
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
        name, sex = f"spk{index:03d}", "F" if rng.random() < 0.5 else "M"
        prototypes = _prototypes(rng, config)
        styles[name] = {e: prototypes[i].round(6).tolist() for i, e in enumerate(config.emotions)}
        for i, emotion in enumerate(config.emotions):
            for take in range(config.per_emotion):
                utt = f"{name}_{emotion}_{take:02d}"
                path = str((out_dir / "wav" / name / f"{utt}.wav").resolve())
                latent = prototypes[i] + config.variability * rng.normal(size=len(FIELDS))
                rows.append({"utterance": utt, "path": path, "speaker": name, "session": int(split_of[index]) + 1,
                             "split": SPLITS[split_of[index]], "emotion": emotion, "sex": sex,
                             **{f"prosody_{f}": round(float(x), 6) for f, x in zip(FIELDS, latent)}})
                jobs.append((path, asdict(VOICES[sex]), _prosody(latent), float(rng.uniform(config.min_seconds, config.max_seconds)),
                             int(rng.integers(2**63))))
    utterances = pd.DataFrame(rows).set_index("utterance")
    utterances["duration"] = render_all(_render, jobs, config.workers, "speaker corpus" if progress else None, 500)
    annotations = build_annotations([(u, "speaker", {e}, e) for u, e in utterances["emotion"].items()])
    info = {"source": "synthetic-speakers", "config": asdict(config), "config_hash": config_hash(config),
            "styles": styles, "generation_seconds": round(time.time() - started, 1)}
    corpus = Corpus(utterances, annotations, name=f"speakers-{config_hash(config)}", info=info).validate(check_audio=False)
    return save_generated(corpus, out_dir)


# ---- the generator's own readers -------------------------------------------------------------------------

def has_oracle(corpus: Corpus) -> bool:
    """Whether `corpus` is one of these generated corpora, with the ground truth the oracles read."""
    return corpus.info.get("source") == "synthetic-speakers" and f"prosody_{FIELDS[0]}" in corpus.utterances.columns


def prototype_prior(config: SpeakerCorpusConfig, emotions) -> tuple[np.ndarray, np.ndarray]:
    """(mean [E * P], cov [E * P, E * P]): the distribution `_prototypes` draws a speaker's stacked voice +
    prototype of each of `emotions` from (STYLE_SCALE units)."""
    canonical = _canonical(emotions)
    P, E = len(FIELDS), len(emotions)
    cov = np.kron(np.ones((E, E)), config.voice ** 2 * np.eye(P))
    for e, emotion in enumerate(emotions):
        part = slice(e * P, (e + 1) * P)
        idiosyncrasy = 0.0 if emotion == "neutral" else config.idiosyncrasy ** 2
        cov[part, part] += config.intensity_spread ** 2 * np.outer(canonical[e], canonical[e]) + idiosyncrasy * np.eye(P)
    return (config.intensity * canonical).ravel(), cov


def reader_prior(corpus: Corpus, emotions) -> dict:
    """What a Bayes-optimal reader of this corpus's utterances knows of it:

        latent  {utterance: x [P]}          what each utterance was generated from
        mean, cov                           the prior over a speaker's stacked prototypes of `emotions` (`prototype_prior`)
        noise   [P, P]                      one utterance's spread around its prototype
        truth   {speaker: [E * P]}          each speaker's own prototypes (what Oracle-Speaker knows)

    Gaussian given the speaker's sex, whose average voice the latent is relative to."""
    config = SpeakerCorpusConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in corpus.info["config"].items()})
    mean, cov = prototype_prior(config, emotions)
    latent = corpus.utterances[[f"prosody_{f}" for f in FIELDS]].to_numpy(float)
    styles = corpus.info["styles"]
    return {"latent": dict(zip(corpus.utterances.index, latent)), "mean": mean, "cov": cov,
            "noise": config.variability ** 2 * np.eye(len(FIELDS)),
            "truth": {s: np.concatenate([styles[s][e] for e in emotions]) for s in styles}}
