"""Audio I/O with soundfile: mono, 16 kHz, float32, with clear errors for bad files."""

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A file that cannot serve as an utterance; the message names the file."""


def _riff_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE `data` chunk when the file holds fewer than declared.

    libsndfile quietly clamps a cut-off WAV to the bytes present, so truncation
    is only visible by comparing the chunk header with the file size.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
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


def probe(path) -> sf._SoundFileInfo:
    """Header-only check: the file exists, is audio soundfile can read, and is not empty."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile raises its own types for non-audio input
        raise AudioError(f"{path}: not a readable audio file ({err})") from err
    if info.frames <= 0:
        raise AudioError(f"{path}: audio file is empty (0 samples)")
    shortfall = _riff_shortfall(path)
    if shortfall:
        raise AudioError(f"{path}: truncated: data chunk declares {shortfall[0]} bytes, file holds {shortfall[1]}")
    return info


def load_audio(path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> torch.Tensor:
    """Read `path` as a mono float32 waveform [T] at `sample_rate`, cut to `max_seconds`.

    Raises AudioError for missing, non-audio, empty or truncated files, and for
    files holding NaN or infinite samples.
    """
    info = probe(path)
    frames = -1
    if max_seconds is not None:  # read only what is kept
        frames = min(info.frames, int(np.ceil(max_seconds * info.samplerate)))
    try:
        data, rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from err
    expected = info.frames if frames < 0 else frames
    if len(data) < expected:
        raise AudioError(f"{path}: truncated: header promises {expected} samples, file holds {len(data)}")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio holds NaN or infinite samples")
    wav = torch.from_numpy(data.mean(axis=1))
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    if max_seconds is not None:
        wav = wav[: int(max_seconds * sample_rate)]
    return wav.contiguous()
