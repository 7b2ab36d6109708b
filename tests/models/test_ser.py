import pytest
import torch

from distmeta.models import SERModel, Upstream, UpstreamConfig, set_scope, trainable_parameters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SERModel(Upstream(UpstreamConfig()))


def test_scopes_choose_exactly_their_parameters(model):
    all_names = {n for n, _ in model.named_parameters()}
    conv = {n for n in all_names if ".feature_extractor." in n}  # frozen by design: its outputs are cached
    assert conv and set(trainable_parameters(set_scope(model, "entire"))) == all_names - conv
    assert set(trainable_parameters(set_scope(model, "head"))) == {n for n in all_names if n.startswith("head.")}
    assert set(trainable_parameters(set_scope(model, "linear"))) == {
        "head.layer_weights", "head.classifier.weight", "head.classifier.bias"}
    with pytest.raises(ValueError, match="scope"):
        set_scope(model, "everything")
    set_scope(model, "entire")


def test_mean_pooling_ignores_padded_frames(model):
    hidden = torch.randn(3, 2, 9, 64)
    padded = hidden.clone()
    padded[:, 1, 5:] = 1e3  # garbage beyond the valid frames
    frames = torch.tensor([9, 5])
    with torch.no_grad():
        logits = model({"hidden": padded, "frames": frames})
        alone = model({"hidden": hidden[:, 1:, :5], "frames": frames[1:]})
    assert torch.allclose(logits[1], alone[0], atol=1e-5)


def test_embedding_is_the_hand_computed_pipeline(model):
    hidden = torch.randn(3, 2, 7, 64)
    frames = torch.tensor([7, 4])
    w = torch.softmax(model.head.layer_weights, 0)
    mixed = (w[:, None, None, None] * hidden).sum(0)
    projected = model.head.projector(mixed)
    expected = torch.stack([projected[0].mean(0), projected[1, :4].mean(0)])
    assert torch.allclose(model.embed({"hidden": hidden, "frames": frames}), expected, atol=1e-6)
    assert torch.allclose(model({"hidden": hidden, "frames": frames}), model.head.classifier(expected), atol=1e-6)


def test_hidden_input_path_equals_waveform_path(model):
    model.eval()
    wavs, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 16000])
    with torch.no_grad():
        hidden, frames = model.upstream(wavs, lengths)
        assert torch.allclose(model({"wavs": wavs, "lengths": lengths}), model({"hidden": hidden, "frames": frames}))


def test_clone_is_independent_and_identical(model):
    model.eval()
    twin = model.clone()
    inputs = {"wavs": torch.randn(1, 16000) * 0.1, "lengths": torch.tensor([16000])}
    with torch.no_grad():
        assert torch.allclose(twin(inputs), model(inputs))
        twin.head.classifier.bias.add_(1.0)
        twin.upstream.model.model.encoder.layers[0].fc1.weight.mul_(0)
        assert not torch.allclose(twin(inputs), model(inputs))
        assert torch.allclose(model.clone()(inputs), model(inputs))
