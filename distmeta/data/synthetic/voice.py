"""A small source-filter voice: glottal pulses with an F0 contour, through formant resonators.

source   Rosenberg glottal flow pulses (open quotient sets tense vs breathy),
         differentiated for lip radiation; jitter (period noise), shimmer
         (per-cycle amplitude noise), creak (alternating weak cycles, low F0),
         aspiration noise; a modal roll-off and a high shelf for spectral tilt.
filter   one cascade of resonators (F1-F4) per syllable, vowel targets scaled
         by the speaker's vocal-tract length; a noise burst for each onset consonant.
envelope per-syllable attack/decay, stress, phrase declination, overall gain.
Background noise is added at a fixed floor, so loud speech has a higher SNR.
"""

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter, sosfilt

SAMPLE_RATE = 16_000
# (F1, F2, F3) of an adult male; F4 fixed at 3500 Hz before vocal-tract scaling.
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]], float)
BASE_LEVEL = 0.05  # RMS of neutral speech


@dataclass
class Speaker:
    f0: float  # neutral mean F0, Hz
    vtl: float  # formant scale: 1.0 a typical male tract, ~1.17 a typical female one
    rate: float  # syllables per second
    expressiveness: float  # multiplies every emotional deviation
    breathiness: float  # baseline aspiration, 0..1


@dataclass
class Prosody:
    """One utterance's deviations from the speaker's neutral voice."""

    f0_st: float = 0.0  # F0 level shift, semitones
    f0_range: float = 1.0  # multiplies pitch-accent excursions
    rate: float = 1.0  # multiplies syllable rate
    gain_db: float = 0.0
    tilt: float = 0.0  # + flatter spectrum (more high-frequency energy)
    open_quotient: float = 0.0  # added to 0.6: - tense, + breathy
    aspiration: float = 0.0
    jitter: float = 0.0  # relative period noise
    shimmer: float = 0.0  # relative cycle amplitude noise
    creak: float = 0.0  # 0..1
    rising_end_st: float = 0.0  # final rise (surprise)
    formant_shift: float = 0.0  # relative formant raise (a smile shortens the vocal tract)


def _resonator_sos(freqs, bandwidths):
    """Second-order sections of a resonator cascade with unit gain at DC."""
    sos = []
    for f, bw in zip(freqs, bandwidths):
        r = np.exp(-np.pi * bw / SAMPLE_RATE)
        a1, a2 = -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r
        sos.append([1 + a1 + a2, 0, 0, 1, a1, a2])
    return np.array(sos)


def synthesize(speaker: Speaker, prosody: Prosody, duration: float, rng: np.random.Generator) -> np.ndarray:
    """A float32 waveform of about `duration` seconds at 16 kHz."""
    return synthesize_with_pitch(speaker, prosody, duration, rng)[0]


def synthesize_with_pitch(speaker: Speaker, prosody: Prosody, duration: float,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`synthesize`'s waveform and the F0 it was voiced with, per sample (Hz; 0 where nothing is voiced:
    pauses and consonant onsets), what a pitch tracker would estimate on real speech."""
    syl_rate = speaker.rate * prosody.rate
    n_syl = max(2, int(round(duration * syl_rate)))
    syl_len = rng.uniform(0.75, 1.25, n_syl) / syl_rate
    bounds = np.concatenate([[0], np.cumsum(syl_len)])
    n = int(bounds[-1] * SAMPLE_RATE) + 1
    t = np.arange(n) / SAMPLE_RATE
    centers = (bounds[:-1] + bounds[1:]) / 2

    # F0 contour in semitones: declination, one accent per syllable, an optional final rise.
    accents = rng.normal(0, 1.6, n_syl) * prosody.f0_range
    contour = np.interp(t, centers, accents) - 2.0 * t / t[-1]
    rise_start = 0.8 * t[-1]
    contour += prosody.rising_end_st * np.clip((t - rise_start) / (t[-1] - rise_start), 0, 1) ** 2
    f0 = speaker.f0 * 2 ** ((prosody.f0_st + contour - 3.0 * prosody.creak) / 12)
    grid = np.arange(0, t[-1] + 0.01, 0.005)  # F0 perturbation every 5 ms, interpolated
    wobble = np.interp(t, grid, rng.normal(0, 1, len(grid)))
    f0 *= 1 + (0.004 + prosody.jitter) * wobble
    phase = np.cumsum(f0 / SAMPLE_RATE)
    cycle, frac = np.floor(phase).astype(int), phase % 1.0

    # Glottal flow (Rosenberg): opening over 60% of the open phase, closing over the rest.
    oq = np.clip(0.6 + prosody.open_quotient, 0.3, 0.9)
    t_open = 0.6 * oq
    flow = np.where(frac < t_open, 0.5 * (1 - np.cos(np.pi * frac / t_open)),
                    np.where(frac < oq, np.cos(0.5 * np.pi * (frac - t_open) / (oq - t_open)), 0.0))
    per_cycle = 1 + (0.02 + prosody.shimmer) * rng.normal(0, 1, cycle[-1] + 1)
    per_cycle *= 1 - 0.7 * prosody.creak * (np.arange(cycle[-1] + 1) % 2)
    voiced = np.diff(flow * per_cycle[cycle], prepend=0.0)
    voiced /= np.sqrt(np.mean(voiced**2)) + 1e-9
    breath = speaker.breathiness + prosody.aspiration
    aspiration = rng.normal(0, 1, n) * (0.05 + breath) * (0.5 + 0.5 * flow)
    source = voiced + aspiration
    source = lfilter([0.2], [1, -0.8], source)  # modal glottal roll-off
    # Spectral tilt: a high shelf above ~1 kHz, +-5 dB per unit of tilt.
    corner = np.exp(-2 * np.pi * 1000 / SAMPLE_RATE)
    low = lfilter([1 - corner], [1, -corner], source)
    source = low + 10 ** (5 * prosody.tilt / 20) * (source - low)
    source /= np.sqrt(np.mean(source**2)) + 1e-9

    out, voicing = np.zeros(n), np.zeros(n)
    bandwidths = np.array([80, 100, 140, 200]) * (1 + 0.5 * breath)
    for i in range(n_syl):
        s0, s1 = int(bounds[i] * SAMPLE_RATE), min(n, int(bounds[i + 1] * SAMPLE_RATE))
        length = s1 - s0
        vowel = VOWELS[rng.integers(len(VOWELS))] * rng.uniform(0.93, 1.07, 3)
        freqs = np.append(vowel, 3500) * speaker.vtl * (1 + prosody.formant_shift)
        segment = sosfilt(_resonator_sos(freqs, bandwidths), source[s0:s1])
        onset = int(length * rng.uniform(0.15, 0.3))
        env = np.ones(length)
        env[:onset] = 0.0
        attack, decay = min(int(0.03 * SAMPLE_RATE), length - onset), min(int(0.06 * SAMPLE_RATE), length - onset)
        env[onset:onset + attack] *= np.linspace(0, 1, attack)
        env[length - decay:] *= np.linspace(1, 0, decay)
        stress = rng.uniform(0.6, 1.0)
        # Onset consonant: band-limited noise burst (fricative or stop release).
        burst = np.zeros(length)
        if onset > 0:
            burst[:onset] = rng.normal(0, 0.25, onset) * np.hanning(onset)
            burst = sosfilt(_resonator_sos([rng.uniform(2500, 6000)], [1500]), burst)
        out[s0:s1] += stress * env * segment + burst
        voicing[s0:s1] = env > 0
    out *= np.linspace(1.0, 0.7, n)  # phrase-level intensity declination
    out *= BASE_LEVEL * 10 ** (prosody.gain_db / 20) / (np.sqrt(np.mean(out**2)) + 1e-9)
    pad = int(rng.uniform(0.05, 0.2) * SAMPLE_RATE)
    out = np.concatenate([np.zeros(pad), out, np.zeros(pad)])
    pitch = np.concatenate([np.zeros(pad), f0 * voicing, np.zeros(pad)]).astype(np.float32)
    floor = BASE_LEVEL * 10 ** (-rng.uniform(30, 40) / 20)
    noise = lfilter([1], [1, -0.9], rng.normal(0, 1, len(out)))
    out += floor * noise / np.sqrt(np.mean(noise**2))
    return np.clip(out, -0.99, 0.99).astype(np.float32), pitch
