import pytest
import torch

from distmeta.models.s3prl_compat import import_s3prl_hub
from distmeta.models.tiny_wavlm import tiny_checkpoint_path
from distmeta.models.upstream import Upstream, UpstreamConfig
from distmeta.training.tiny_wavlm import build_tiny_checkpoint, ready


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


def test_cached_conv_features_give_the_same_hidden_states_and_gradients():
    torch.manual_seed(0)
    up = Upstream(UpstreamConfig())
    assert up.conv_cacheable  # s3prl's WavLM wrapper never trains its conv encoder (feature_grad_mult = 0)
    wav = torch.randn(12000) * 0.1
    lengths = torch.tensor([12000])
    conv = up.conv_features(wav)
    assert conv.shape[-1] == int(up.frame_counts(lengths)[0])
    from_audio, frames = up(wav[None], lengths)
    from_conv, conv_frames = up(None, lengths, conv=conv[None])
    assert torch.equal(frames, conv_frames)
    assert torch.allclose(from_audio, from_conv, atol=1e-5)
    grads = []
    for inputs in ({"wavs": wav[None]}, {"conv": conv[None]}):
        up.zero_grad()
        hidden, _ = up(inputs.get("wavs"), lengths, conv=inputs.get("conv"))
        hidden.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in up.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and not any("feature_extractor" in n for n in grads[0])
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6) for n in grads[0])
    # the extractor is itself again afterwards: raw audio still goes through it
    assert torch.allclose(up(wav[None], lengths)[0], from_audio)


def test_an_upstream_shipped_to_a_node_without_the_drivers_files_is_the_drivers(tmp_path, monkeypatch):
    """Nodes share no disk: a worker builds the upstream from the checkpoint bytes the driver ships
    (`portable` -> `landed`), for a locally built tiny one and for a *_local checkpoint, and a tiny
    checkpoint the node built differently itself is replaced by the driver's."""
    from distmeta.models.upstream import landed, portable

    local = UpstreamConfig(name="wavlm_local", path=str(build_tiny_checkpoint(tmp_path / "mine.pt", seed=3)))
    for config in (UpstreamConfig(seed=4), local):
        monkeypatch.setenv("DISTMETA_CACHE", str(tmp_path / "driver"))
        ready(config)  # what the job does on the driver
        driver = Upstream(config).state_dict()
        shipped = portable(config)
        monkeypatch.setenv("DISTMETA_CACHE", str(tmp_path / "node"))  # the node's own, empty cache
        if config.name == "tiny":  # the node once built its own from other weights
            build_tiny_checkpoint(tiny_checkpoint_path(config.seed), seed=9)
        on_node = landed(config, shipped)
        assert str(tmp_path / "driver") not in on_node.path
        node = Upstream(on_node).state_dict()
        assert all(torch.equal(driver[k], node[k]) for k in driver)
    assert landed(UpstreamConfig(name="fbank"), portable(UpstreamConfig(name="fbank"))) == UpstreamConfig(name="fbank")
