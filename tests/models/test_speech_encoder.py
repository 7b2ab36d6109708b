"""The speech encoder: its frames do not depend on the batch, Upstream wraps it like an s3prl upstream."""

import pytest
import torch

from distmeta.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig, log_mel
from distmeta.models.upstream import Upstream, UpstreamConfig
from distmeta.training.artifacts import save_model

SMALL = SpeechEncoderConfig(dim=32, layers=2, heads=2, ffn_dim=64)


def test_log_mel_frames_are_ten_milliseconds():
    wav = torch.randn(16000 + 250)
    mel = log_mel(wav)
    assert mel.shape == (101, 80)
    assert torch.allclose(log_mel(wav[:1600])[:8], mel[:8], atol=1e-4)  # frame i reads samples 160 i +- 200 only


def test_batched_frames_equal_each_utterance_alone():
    torch.manual_seed(0)
    encoder = SpeechEncoder(SMALL).eval()
    wavs = [torch.randn(32000), torch.randn(16000 + 300), torch.randn(9000)]
    batched = encoder(wavs)["hidden_states"]
    assert len(batched) == SMALL.layers + 1
    for i, wav in enumerate(wavs):
        alone = encoder([wav])["hidden_states"]
        frames = len(wav) // encoder.get_downsample_rates()
        assert alone[-1].shape[1] == frames
        for layer in range(len(alone)):
            assert torch.allclose(batched[layer][i, :frames], alone[layer][0], atol=1e-5), (i, layer)


def test_upstream_loads_a_saved_encoder(tmp_path):
    torch.manual_seed(1)
    encoder = SpeechEncoder(SMALL).eval()
    path = tmp_path / "encoder.safetensors"
    save_model(path, encoder.state_dict(), {"settings": {}, "encoder": vars(SMALL)})
    upstream = Upstream(UpstreamConfig(name="speech_encoder", path=str(path))).eval()
    assert (upstream.num_layers, upstream.dim, upstream.conv_cacheable) == (SMALL.layers + 1, SMALL.dim, False)
    wavs = torch.zeros(2, 24000)
    wavs[0].normal_()
    wavs[1, :12000].normal_()
    hidden, frames = upstream(wavs, torch.tensor([24000, 12000]))
    assert frames.tolist() == [37, 18]  # samples // 640: what the frames are
    assert torch.allclose(hidden[-1, 1, :18], encoder([wavs[1, :12000]])["hidden_states"][-1][0], atol=1e-5)


def test_speech_encoder_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="upstream.path"):
        Upstream(UpstreamConfig(name="speech_encoder"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Upstream(UpstreamConfig(name="speech_encoder", path=str(tmp_path / "nope.safetensors")))
