import pytest
import torch

from distmeta.models import SERHead, SERModel, Upstream, UpstreamConfig, set_scope, trainable_parameters


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


def test_logits_apply_the_product_of_projection_and_classifier_with_the_same_gradients():
    # logits_pooled folds the two affine layers into one; the function and its gradients stay the layered ones
    torch.manual_seed(3)
    head = SERHead(3, 64).double()
    with torch.no_grad():
        head.layer_weights.normal_()
    pooled = torch.randn(3, 5, 64, dtype=torch.float64)
    folded = head.logits_pooled(pooled)
    layered = head.classifier(head.embed_pooled(pooled))
    assert torch.allclose(folded, layered, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(folded)
    got = torch.autograd.grad((folded * weights).sum(), list(head.parameters()))
    expected = torch.autograd.grad((layered * weights).sum(), list(head.parameters()))
    assert all(torch.allclose(g, e, rtol=1e-10, atol=1e-12) for g, e in zip(got, expected))


def test_hidden_input_path_equals_waveform_path(model):
    model.eval()
    wavs, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 16000])
    with torch.no_grad():
        hidden, frames = model.upstream(wavs, lengths)
        assert torch.allclose(model({"wavs": wavs, "lengths": lengths}), model({"hidden": hidden, "frames": frames}), atol=1e-6)


def test_clone_is_independent_and_identical(model, monkeypatch):
    import distmeta.models.upstream as upstream_module

    def no_disk(*args):  # a model that reached another node through Ray has no checkpoint there to rebuild from
        raise AssertionError("clone read the upstream's checkpoint again")

    monkeypatch.setattr(upstream_module, "checkpoint", no_disk)
    model.eval()
    set_scope(model, "head")
    twin = model.clone()
    assert [p.requires_grad for p in twin.parameters()] == [p.requires_grad for p in model.parameters()]
    set_scope(model, "entire")
    inputs = {"wavs": torch.randn(1, 16000) * 0.1, "lengths": torch.tensor([16000])}
    with torch.no_grad():
        assert torch.allclose(twin(inputs), model(inputs))
        twin.head.classifier.bias.add_(1.0)
        twin.upstream.model.model.encoder.layers[0].fc1.weight.mul_(0)
        assert not torch.allclose(twin(inputs), model(inputs))
        assert torch.allclose(model.clone()(inputs), model(inputs))


def test_from_conv_features_each_utterance_gets_its_features_alone_whatever_its_batch(model, monkeypatch):
    """From cached conv features an utterance's logits do not depend on what it is batched with: s3prl's
    padding mask marks exactly the frames past its own (models/upstream.py), in one padded batch or in
    LENGTH_GROUPS groups (models/ser.py), rows back in the batch's order."""
    import distmeta.models.ser as ser
    from torch.nn.utils.rnn import pad_sequence

    model.eval()
    torch.manual_seed(1)
    lengths = [41000, 9000, 23000, 16000, 30500, 12000, 9000]
    convs = [model.upstream.conv_features(torch.randn(n) * 0.1) for n in lengths]
    inputs = {"conv": pad_sequence([c.T for c in convs], batch_first=True).transpose(1, 2), "lengths": torch.tensor(lengths)}
    with torch.no_grad():
        singles = torch.cat([model({"conv": c[None], "lengths": torch.tensor([n])}) for c, n in zip(convs, lengths)])
        grouped = model(inputs)
        monkeypatch.setattr(ser, "LENGTH_GROUPS", 1)
        padded = model(inputs)
    assert torch.allclose(grouped, singles, atol=1e-5), (grouped - singles).abs().max()
    assert torch.allclose(padded, singles, atol=1e-5), (padded - singles).abs().max()


def test_a_batch_runs_in_length_groups_each_padded_to_its_own_longest(model, monkeypatch):
    """Waveforms (upstreams without a cacheable conv encoder): a padded batch moves a shorter utterance's
    logits, so the groups show. Four lengths twice each, shuffled, in four groups: each holds one length, so each
    row's logits, back in the batch's order, are its logits alone; padded to the batch's longest they are not."""
    import distmeta.models.ser as ser
    from torch.nn.utils.rnn import pad_sequence

    model.eval()
    torch.manual_seed(1)
    lengths = [30500, 9000, 41000, 16000, 9000, 41000, 30500, 16000]
    wavs = [torch.randn(n) * 0.1 for n in lengths]
    inputs = {"wavs": pad_sequence(wavs, batch_first=True), "lengths": torch.tensor(lengths)}
    monkeypatch.setattr(ser, "LENGTH_GROUPS", 4)  # a group per length
    with torch.no_grad():
        singles = torch.cat([model({"wavs": w[None], "lengths": torch.tensor([len(w)])}) for w in wavs])
        grouped = model(inputs)
        monkeypatch.setattr(ser, "LENGTH_GROUPS", 1)
        padded = model(inputs)
    assert torch.allclose(grouped, singles, atol=1e-5), (grouped - singles).abs().max()
    assert not torch.allclose(padded, singles, atol=1e-5)
