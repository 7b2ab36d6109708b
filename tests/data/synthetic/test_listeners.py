import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from distmeta.data import make_synthetic_corpus, oracle_gap
from distmeta.data.synthetic.listeners import EXTERNAL_BIAS, EXTERNAL_COVERAGE, prosody_for
from distmeta.data.synthetic.voice import SAMPLE_RATE, Prosody, Speaker, synthesize, synthesize_with_pitch
from distmeta.labels import CLASSES


def _digest(corpus):
    h = hashlib.sha256()
    for path in corpus.utterances["path"]:
        h.update(open(path, "rb").read())
    return h.hexdigest()


@pytest.mark.slow
def test_same_seed_same_corpus_other_seed_other_corpus(tmp_path):
    a = make_synthetic_corpus(tmp_path / "a", seed=5, n_utterances=40, progress=False)
    b = make_synthetic_corpus(tmp_path / "b", seed=5, n_utterances=40, progress=False)
    c = make_synthetic_corpus(tmp_path / "c", seed=6, n_utterances=40, progress=False)
    assert a.annotations.equals(b.annotations)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_cached_corpus_is_reused_not_regenerated(tmp_path):
    first = make_synthetic_corpus(tmp_path, seed=1, n_utterances=20, progress=False)
    stamp = [Path(p).stat().st_mtime_ns for p in first.utterances["path"]]
    again = make_synthetic_corpus(tmp_path, seed=1, n_utterances=20, progress=False)
    assert [Path(p).stat().st_mtime_ns for p in again.utterances["path"]] == stamp
    assert again.annotations.equals(first.annotations)


def test_a_cached_corpus_whose_audio_changed_is_generated_again(tmp_path, capsys):
    import os

    first = make_synthetic_corpus(tmp_path, seed=1, n_utterances=10, progress=False)
    fingerprint, path = first.fingerprint(), Path(first.utterances["path"].iloc[3])
    original = path.read_bytes()
    wav, rate = sf.read(path)
    sf.write(path, np.zeros_like(wav), rate)  # rewritten in place: same size, other content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a clock that is coarse or set back
    assert first.fingerprint() != fingerprint
    again = make_synthetic_corpus(tmp_path, seed=1, n_utterances=10, progress=False)
    assert "audio files changed" in capsys.readouterr().out
    assert path.read_bytes() == original  # generated again, not served stale
    assert again.annotations.equals(first.annotations)


def test_fingerprint_is_stable_and_follows_the_labels(tmp_path):
    first = make_synthetic_corpus(tmp_path, seed=1, n_utterances=10, progress=False)
    again = make_synthetic_corpus(tmp_path, seed=1, n_utterances=10, progress=False)  # loaded from disk
    assert again.fingerprint() == first.fingerprint()
    relabelled = again.annotations.copy()
    relabelled.loc[0, list(CLASSES)] = 1 - relabelled.loc[0, list(CLASSES)]
    assert type(again)(again.utterances, relabelled, again.name, again.info).fingerprint() != first.fingerprint()


def test_structure_like_iemocap(small_corpus):
    utts, ann = small_corpus.utterances, small_corpus.annotations
    assert sorted(utts["speaker"].unique()) == [f"S{s}{g}" for s in range(1, 6) for g in "FM"]
    assert small_corpus.sessions == [1, 2, 3, 4, 5]
    assert ann.groupby("utterance").size().min() >= 3
    externals = list(EXTERNAL_BIAS)
    self_reports = [a for a in small_corpus.annotators if a not in externals]
    assert len(externals) == 5 and len(self_reports) == 6
    labelled = ann.merge(utts[["session"]], left_on="utterance", right_index=True)  # each label with its session
    sessions = labelled.groupby("annotator")["session"]
    for a in externals:
        assert sessions.nunique()[a] == 5
    # Each external labels most of every session: the unseen test pool is one session, and the items in it
    # beyond the 128 queries are all Entire-All learns the annotator from (docs/listener.md).
    assert min(EXTERNAL_COVERAGE.values()) >= 0.75
    count = labelled.groupby(["annotator", "session"]).size()
    per_session = utts["session"].value_counts()
    for a in externals:
        shares = count[a] / per_session.loc[count[a].index]
        assert (shares > EXTERNAL_COVERAGE[a] - 0.15).all(), (a, shares)
    for a in self_reports:
        assert set(sessions.unique()[a]) == {int(a[1])}  # only their own session
    for path in utts["path"].iloc[:20]:
        info = sf.info(path)
        assert info.samplerate == 16000 and 1.0 <= info.duration <= 4.6
    for model in small_corpus.info["listeners"].values():
        assert np.allclose(np.sum(model["confusion"], axis=1), 1)


def _features(path):
    """Level (dB), alpha ratio (dB of power above vs below 1 kHz) and median F0 (Hz) of the voiced frames."""
    wav, rate = sf.read(path)
    frames = np.lib.stride_tricks.sliding_window_view(wav, 640)[::320]
    energy = np.sqrt((frames**2).mean(1))
    voiced = frames[energy > 0.5 * energy.max()]
    power = (np.abs(np.fft.rfft(voiced * np.hanning(640), axis=1)) ** 2).mean(0)
    freqs = np.fft.rfftfreq(640, 1 / rate)
    alpha = 10 * np.log10(power[freqs >= 1000].sum() / power[freqs < 1000].sum())
    f0s = []
    for frame in voiced:
        ac = np.correlate(frame, frame, "full")[639:]
        lo, hi = rate // 400, rate // 60
        f0s.append(rate / (lo + np.argmax(ac[lo:hi])))
    return 20 * np.log10(np.sqrt((wav**2).mean())), alpha, np.median(f0s)


@pytest.mark.slow
def test_audio_carries_the_acoustic_correlates(small_corpus):
    utts = small_corpus.utterances
    feats = pd.DataFrame([_features(p) for p in utts["path"]], index=utts.index, columns=["level", "alpha", "f0"])
    female = feats["f0"][utts["speaker"].str.endswith("F") & (utts["emotion"] == "neutral")].mean()
    male = feats["f0"][utts["speaker"].str.endswith("M") & (utts["emotion"] == "neutral")].mean()
    assert female > 1.4 * male  # speakers' own F0 ranges
    feats["f0"] = 12 * np.log2(feats["f0"])  # semitones
    relative = feats - feats.groupby(utts["speaker"]).transform("mean")  # relative to each speaker
    pure = utts[[c for c in utts.columns if c.startswith("latent_")]].max(axis=1) == 1
    strong = pure & (utts["strength"] > 0.7)
    means = relative[strong].groupby(utts["emotion"][strong]).mean()
    angry, neutral, sad, excited = (means.loc[e] for e in ("angry", "neutral", "sad", "excited"))
    assert angry["level"] > neutral["level"] + 3 > sad["level"] + 6  # intensity
    assert excited["f0"] > neutral["f0"] + 3 > sad["f0"] + 3  # F0 level


def test_anger_flattens_the_spectrum(tmp_path):
    """High-frequency energy, on one voice with the same random draws: a corpus sample of ~15 items per
    class is too noisy for the alpha ratio (vowels move it by several dB). Sadness's lower tilt is offset by
    its breathy aspiration noise, so only anger's flatter spectrum is a reliable cue."""
    speaker = Speaker(f0=120, vtl=1.0, rate=4.5, expressiveness=1.0, breathiness=0.05)
    alpha = {}
    for emotion in ("neutral", "angry"):
        latent = np.eye(len(CLASSES))[CLASSES.index(emotion)]
        values = []
        for seed in range(12):
            rng = np.random.default_rng(seed)
            sf.write(tmp_path / "x.wav", synthesize(speaker, prosody_for(latent, 1.0, rng), 2.5, rng), SAMPLE_RATE)
            values.append(_features(tmp_path / "x.wav")[1])
        alpha[emotion] = np.mean(values)
    assert alpha["angry"] > alpha["neutral"] + 2


def test_the_pitch_track_is_the_f0_the_audio_was_voiced_with():
    """The per-sample F0 that `synthesize_with_pitch` reports (the upstream's pitch-worker target) against
    an autocorrelation pitch estimate of the waveform itself, and the audio is `synthesize`'s, unchanged."""
    speaker = Speaker(f0=120, vtl=1.0, rate=3.0, expressiveness=1.0, breathiness=0.0)
    prosody = Prosody(f0_st=4.0)
    wav, pitch = synthesize_with_pitch(speaker, prosody, 2.0, np.random.default_rng(3))
    np.testing.assert_array_equal(wav, synthesize(speaker, prosody, 2.0, np.random.default_rng(3)))
    assert pitch.shape == wav.shape and pitch[0] == 0 and pitch[-1] == 0  # the pauses around the speech are unvoiced
    voiced = pitch > 0
    assert 0.5 < voiced.mean() < 0.95  # consonant onsets and pauses are not voiced
    checked = 0
    for start in range(0, len(wav) - 640, 640):  # 40 ms windows that are voiced throughout
        window = slice(start, start + 640)
        if not voiced[window].all():
            continue
        x = wav[window] - wav[window].mean()
        lags = np.arange(SAMPLE_RATE // 500, SAMPLE_RATE // 80)
        correlation = [np.dot(x[:-lag], x[lag:]) / np.sqrt(np.dot(x[:-lag], x[:-lag]) * np.dot(x[lag:], x[lag:])) for lag in lags]
        estimate = SAMPLE_RATE / lags[int(np.argmax(correlation))]
        assert abs(12 * np.log2(estimate / pitch[window].mean())) < 1.0  # within a semitone
        checked += 1
    assert checked >= 10
    # the final rise is in the track: without pitch accents the contour is the phrase's 2-semitone declination
    # (-1 at the middle, -2 at the end) plus the 6-semitone rise at the end
    _, pitch = synthesize_with_pitch(speaker, Prosody(f0_st=4.0, f0_range=0.0, rising_end_st=6.0), 2.0, np.random.default_rng(3))
    middle, end = np.flatnonzero(pitch > 0)[[int((pitch > 0).sum()) // 2, -1]]
    assert 4.0 < 12 * np.log2(pitch[end] / pitch[middle]) < 5.5


def test_listeners_differ_like_table_a1_and_it_matters(small_corpus):
    dist = small_corpus.label_distribution(list(EXTERNAL_BIAS))
    spread = dist.max(axis=1) - dist.min(axis=1)
    assert spread["neutral"] > 25 and spread["frustrated"] > 10  # paper: 43 and 26 points
    assert (dist.loc["# of annotations/data"] < 1.3).all()
    gap = oracle_gap(small_corpus)
    assert gap["gap_maF1"].mean() > 0.03
    assert (gap["gap_maF1"] > 0).mean() >= 0.8
