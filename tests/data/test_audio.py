import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from distmeta.data.audio import AudioError, load_audio


def _write(path, data, rate, subtype="PCM_16"):
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def test_stereo_is_mixed_down_and_resampled(tmp_path):
    t = np.arange(8000) / 8000
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)
    path = _write(tmp_path / "s.wav", np.stack([left, right], 1) * 0.5, 8000, "FLOAT")
    wav = load_audio(path)
    mono = torch.tensor((left + right) / 2 * 0.5, dtype=torch.float32)
    assert wav.shape == (16000,)
    assert torch.allclose(wav, AF.resample(mono, 8000, 16000), atol=1e-6)


def test_length_cap(tmp_path):
    path = _write(tmp_path / "long.wav", np.zeros(48000) + 0.1, 16000)
    assert load_audio(path, max_seconds=1.5).shape == (24000,)


def test_bad_files_raise_clear_errors(tmp_path):
    empty = _write(tmp_path / "empty.wav", np.zeros(0), 16000)
    nan = _write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2]), 16000, "FLOAT")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    full = _write(tmp_path / "full.wav", np.random.default_rng(0).normal(0, 0.1, 16000), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    cases = {empty: "empty", nan: "NaN", text: "not a readable audio file", cut: "truncated",
             tmp_path / "missing.wav": "not found"}
    for path, reason in cases.items():
        with pytest.raises(AudioError, match=reason) as err:
            load_audio(path)
        assert str(path) in str(err.value)


def _header(rate: int, data_bytes: int) -> bytes:
    """A 44-byte PCM_16 mono WAV header claiming `rate` and `data_bytes` of samples (the samples follow)."""
    import struct

    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def test_a_headers_sample_rate_and_length_are_checked_before_decoding():
    """A 64-byte file claiming an odd rate made torchaudio's resampler take memory in proportion to the rate
    (3,201 Hz: 843 MiB; 48,001 Hz: ~12 GB); clips handed to a personalized model are refused on the header."""
    import resource

    from distmeta.data.audio import AudioLimits, read_clip

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for rate, reason in ((3_201, "outside 8000-48000 Hz"), (48_001, "outside 8000-48000 Hz"), (47_999, "not one distmeta resamples")):
        with pytest.raises(AudioError, match=f"request body: sample rate {rate} Hz is {reason}"):
            read_clip(_header(rate, 20) + b"\x01\x00" * 10, name="request body")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # kB: nothing was resampled
    ok = read_clip(_header(44_100, 882) + b"\x01\x00" * 441)  # a usual rate passes, resampled to 16 kHz
    assert ok.shape == (160,)
    # ten minutes of silence as FLAC is ~28 KB; the header says how long it is before anything is decoded
    import io

    long = io.BytesIO()
    sf.write(long, np.zeros(16_000 * 600, dtype=np.float32), 16_000, format="FLAC")
    assert len(long.getvalue()) < 100_000
    with pytest.raises(AudioError, match="clip: 600.0 s long; at most 60 s"):
        read_clip(long.getvalue(), limits=AudioLimits(max_seconds=60), name="clip")
    with pytest.raises(AudioError, match="samples: 120.0 s long"):
        read_clip(np.zeros(16_000 * 120, dtype=np.float32), 16_000, AudioLimits(max_seconds=60), name="samples")
