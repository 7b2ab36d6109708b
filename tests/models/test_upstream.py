import pytest
import torch

from distmeta.models.s3prl_compat import import_s3prl_hub
from distmeta.models.upstream import Upstream, UpstreamConfig, build_tiny_checkpoint


def test_tiny_upstream_loads_through_s3prl_wavlm_local(tmp_path):
    up = Upstream(UpstreamConfig())
    assert type(up.model).__module__ == "s3prl.upstream.wavlm.expert"
    wavs = torch.randn(2, 16000) * 0.1
    hidden, frames = up(wavs, torch.tensor([16000, 8000]))
    assert hidden.shape[:2] == (up.num_layers, 2) and hidden.shape[-1] == up.dim
    assert frames.tolist() == [49, 24]  # what the CNN yields for each utterance alone
    assert up(wavs[1:, :8000], torch.tensor([8000]))[0].shape[2] == 24
    # WavLM's frame mask keeps a partly padded frame: its 16-frame positional convolution spreads
    # it into the last ~8 frames of the input layer, and attention lets every frame see it a little.
    up.eval()
    with torch.no_grad():
        hidden, _ = up(wavs, torch.tensor([16000, 8000]))
        alone, _ = up(wavs[1:, :8000], torch.tensor([8000]))
    assert torch.allclose(hidden[0, 1, :24 - 9], alone[0, 0, :24 - 9], atol=1e-4)
    assert torch.allclose(hidden[:, 1, :24 - 9], alone[:, 0, :24 - 9], atol=0.01)


def test_tiny_checkpoint_is_weights_only_loadable(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "tiny.pt", seed=1)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) == {"cfg", "model"} and checkpoint["cfg"]["encoder_layers"] == 2


def test_local_checkpoint_through_hub_name(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "tiny.pt", seed=2)
    up = Upstream(UpstreamConfig(name="wavlm_local", path=str(path)))
    assert up.num_layers == 3


def test_bad_upstream_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown upstream 'wavlmm'"):
        Upstream(UpstreamConfig(name="wavlmm"))
    with pytest.raises(FileNotFoundError, match="upstream.path"):
        Upstream(UpstreamConfig(name="hubert_local", path=str(tmp_path / "nope.pt")))


def test_compat_shim_keeps_s3prl_importable_and_sox_explicit():
    hub = import_s3prl_hub()
    assert hasattr(hub, "wavlm_local")
    import torchaudio

    with pytest.raises(RuntimeError, match="soundfile"):
        torchaudio.sox_effects.apply_effects_tensor(torch.zeros(1, 10), 16000, [])
