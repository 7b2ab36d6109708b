"""Audio I/O with soundfile: mono, 16 kHz, float32, with clear errors for bad files.

`load_audio` reads a file for the corpora. `read_clip` reads what a person hands to a personalized model: a
path, a file's bytes (an HTTP body), or samples with their rate, within `AudioLimits` checked on the header
before anything is decoded (a header may claim any rate or length; resampling a claimed rate costs memory in
proportion to it).
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A file that cannot serve as an utterance; the message names the file."""


def _riff_shortfall(source) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE `data` chunk when the file (a path or bytes) holds fewer than
    declared.

    libsndfile quietly clamps a cut-off WAV to the bytes present, so truncation
    is only visible by comparing the chunk header with the file size.
    """
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    with (io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")) as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            chunk, length = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                present = size - f.tell()
                # 0xFFFFFFFF marks a streamed WAV of unknown length
                return (length, present) if present < length and length != 0xFFFFFFFF else None
            f.seek(length + (length & 1), 1)


def probe(path, name=None) -> sf._SoundFileInfo:
    """Header-only check: the file (a path, or a file's bytes called `name`) exists, is audio soundfile can
    read, and is not empty."""
    if not isinstance(path, bytes):
        path = Path(path)
        if not path.is_file():
            raise AudioError(f"{path}: audio file not found")
    name = name or path
    try:
        info = sf.info(io.BytesIO(path) if isinstance(path, bytes) else str(path))
    except Exception as err:  # libsndfile raises its own types for non-audio input
        reason = str(err).split(": ", 1)[-1] if isinstance(path, bytes) else err  # not "<_io.BytesIO at 0x...>"
        raise AudioError(f"{name}: not a readable audio file ({reason})") from err
    if info.frames <= 0:
        raise AudioError(f"{name}: audio file is empty (0 samples)")
    shortfall = _riff_shortfall(path)
    if shortfall:
        raise AudioError(f"{name}: truncated: data chunk declares {shortfall[0]} bytes, file holds {shortfall[1]}")
    return info


@dataclass(frozen=True)
class AudioLimits:
    """What a clip handed to a personalized model may be, checked before decoding: its sample rate within
    [min_rate, max_rate] Hz and one the resampler handles in bounded memory, and at most `max_seconds` long
    (None: any length)."""
    min_rate: int = 8_000
    max_rate: int = 48_000
    max_seconds: float | None = None

    def check(self, rate: int, frames: int, name) -> None:
        if not self.min_rate <= rate <= self.max_rate:
            raise AudioError(f"{name}: sample rate {rate} Hz is outside {self.min_rate}-{self.max_rate} Hz")
        # torchaudio's resampler builds SAMPLE_RATE / gcd filters, each as long as rate / gcd: a rate sharing
        # little with 16 kHz (47,999 Hz) would take gigabytes; every usual rate (8k, 11.025k, ..., 48k) passes
        if SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE) > 640:
            raise AudioError(f"{name}: sample rate {rate} Hz is not one distmeta resamples (use a standard rate: "
                             f"8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000 Hz)")
        if self.max_seconds is not None and frames > self.max_seconds * rate:
            raise AudioError(f"{name}: {frames / rate:.1f} s long; at most {self.max_seconds:g} s")


def load_audio(path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
               limits: AudioLimits | None = None, name=None) -> torch.Tensor:
    """Read `path` (or a file's bytes, called `name` in errors) as a mono float32 waveform [T] at
    `sample_rate`, cut to `max_seconds`; `limits`, when given, are checked on the header first.

    Raises AudioError for missing, non-audio, empty, truncated or out-of-limits files, and for
    files holding NaN or infinite samples.
    """
    info = probe(path, name)
    name = name or path
    if limits is not None:
        limits.check(info.samplerate, info.frames, name)
    frames = -1
    if max_seconds is not None:  # read only what is kept
        frames = min(info.frames, int(np.ceil(max_seconds * info.samplerate)))
    try:
        data, rate = sf.read(io.BytesIO(path) if isinstance(path, bytes) else str(path), frames=frames,
                             dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{name}: cannot decode audio ({err})") from err
    expected = info.frames if frames < 0 else frames
    if len(data) < expected:
        raise AudioError(f"{name}: truncated: header promises {expected} samples, file holds {len(data)}")
    return _waveform(data.mean(axis=1), rate, sample_rate, max_seconds, name)


def _waveform(samples: np.ndarray, rate: int, sample_rate: int, max_seconds: float | None, name) -> torch.Tensor:
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: audio holds NaN or infinite samples")
    wav = torch.as_tensor(samples, dtype=torch.float32)
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    if max_seconds is not None:
        wav = wav[: int(max_seconds * sample_rate)]
    return wav.contiguous()


def read_clip(clip, sample_rate: int | None = None, limits: AudioLimits = AudioLimits(), max_seconds: float | None = None,
              name=None) -> torch.Tensor:
    """One clip handed to a personalized model, as a mono float32 waveform at 16 kHz: a path, a file's bytes,
    or samples ([T], or [T, channels]) at `sample_rate`. Errors name the clip (`name`, else the path)."""
    if isinstance(clip, (str, Path, bytes)):  # a file says its own rate: `sample_rate` is for samples
        return load_audio(clip, max_seconds=max_seconds, limits=limits, name=name)
    name = name or "clip"
    samples = np.asarray(clip.detach().cpu() if isinstance(clip, torch.Tensor) else clip, dtype=np.float32)
    if sample_rate is None:
        raise ValueError(f"{name}: samples need their sample_rate")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or not len(samples):
        raise AudioError(f"{name}: expected samples [T] or [T, channels], got shape {tuple(np.shape(clip))}")
    limits.check(int(sample_rate), len(samples), name)
    return _waveform(samples, int(sample_rate), SAMPLE_RATE, max_seconds, name)
