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
