"""FrameBank: each utterance's frames are what the upstream gives for it alone; safetensors round trip."""

import torch

from distmeta.features import AudioBank, FrameBank
from distmeta.models.upstream import Upstream, UpstreamConfig


def test_frame_bank_matches_each_utterance_alone_and_round_trips(tmp_path):
    upstream = Upstream(UpstreamConfig(name="tiny"))
    # reference: each utterance alone (a padded batch would change the shorter utterances' frames)
    audio = object.__new__(AudioBank)  # waveforms given directly instead of read from a corpus
    g = torch.Generator().manual_seed(0)
    audio.items = {f"u{i}": torch.randn(n, generator=g) * 0.1 for i, n in enumerate([16000, 9000, 23000, 5000])}
    bank = FrameBank(upstream, audio, layer=-1)
    for u, wav in audio.items.items():
        with torch.no_grad():
            hidden, frames = upstream(wav[None], torch.tensor([len(wav)]))
        torch.testing.assert_close(bank.items[u], hidden[-1, 0, :int(frames[0])], atol=1e-4, rtol=1e-4)
    batch = bank.batch(["u3", "u2"])
    assert batch["frames"].shape == (2, len(bank.items["u2"]), bank.dim)
    assert batch["frame_mask"].sum(1).tolist() == [len(bank.items["u3"]), len(bank.items["u2"])]
    bank.save(tmp_path / "frames.safetensors")
    loaded = FrameBank.load(tmp_path / "frames.safetensors")
    assert loaded.items.keys() == bank.items.keys()
    assert all(torch.equal(loaded.items[u], bank.items[u]) for u in bank.items)


def test_conv_feature_bank_batches_like_each_utterance_alone():
    from distmeta.features import ConvFeatureBank, PooledBank, input_bank
    from distmeta.models.ser import SERModel

    torch.manual_seed(0)
    model = SERModel(Upstream(UpstreamConfig(name="tiny"))).eval()
    audio = object.__new__(AudioBank)
    g = torch.Generator().manual_seed(1)
    audio.items = {f"u{i}": torch.randn(n, generator=g) * 0.1 for i, n in enumerate([16000, 9000, 23000])}
    bank = input_bank(model.upstream, audio)
    assert isinstance(bank, ConvFeatureBank) and bank.length("u1") == 9000
    batch = bank.batch(["u1", "u2"])
    assert batch["conv"].shape[0] == 2 and batch["lengths"].tolist() == [9000, 23000]
    with torch.no_grad():
        # the longest utterance of a batch sees no padding: exactly its own logits
        torch.testing.assert_close(model(batch)[1], model(audio.batch(["u2"]))[0], atol=1e-5, rtol=1e-5)
        # pooled features from the conv bank equal those from the audio, one utterance at a time
        for u in audio.items:
            one = object.__new__(AudioBank)
            one.items = {u: audio.items[u]}
            torch.testing.assert_close(PooledBank(model.upstream, bank.subset([u])).items[u],
                                       PooledBank(model.upstream, one).items[u], atol=1e-5, rtol=1e-5)


def test_a_shared_input_bank_serves_only_models_with_its_conv_encoder():
    from distmeta.features import inputs_for, input_bank

    audio = object.__new__(AudioBank)
    audio.items = {"a": torch.randn(8000) * 0.1, "b": torch.randn(9000) * 0.1}
    same = Upstream(UpstreamConfig(name="tiny"))
    shared = input_bank(same, audio)
    part = inputs_for(Upstream(UpstreamConfig(name="tiny")), ["b"], shared)  # another instance, same weights
    assert list(part.items) == ["b"] and torch.equal(part.items["b"][0], shared.items["b"][0])
    other = Upstream(UpstreamConfig(name="tiny", seed=1))
    import pytest

    with pytest.raises(ValueError, match="another conv encoder"):
        inputs_for(other, ["a"], shared)
    with pytest.raises(KeyError, match="lacks 1 utterances"):
        inputs_for(same, ["a", "zzz"], shared)


def test_pooled_features_of_a_shared_bank_are_computed_once_per_upstream_and_equal_a_bank_of_their_own():
    from distmeta.features import POOLED_KEPT, PooledBank, input_bank, inputs_for, pooled_for

    audio = object.__new__(AudioBank)
    g = torch.Generator().manual_seed(2)
    audio.items = {f"u{i}": torch.randn(n, generator=g) * 0.1 for i, n in enumerate([16000, 9000, 9000, 23000])}
    upstream = Upstream(UpstreamConfig(name="tiny"))
    shared = input_bank(upstream, audio)
    part = pooled_for(upstream, ["u2", "u0"], shared)
    alone = PooledBank(upstream, inputs_for(upstream, ["u2", "u0"], shared))
    assert list(part.items) == ["u2", "u0"]
    for u in part.items:  # u2 shares its batch with u1 (equal lengths) in the shared bank: rounding only
        torch.testing.assert_close(part.items[u], alone.items[u], atol=1e-6, rtol=1e-5)
    # the same weights in another instance (a split's Meta-PerSER and its adapters): no second run
    twin = Upstream(UpstreamConfig(name="tiny"))
    assert twin.digest() == upstream.digest() and shared.pooled(twin) is shared.pooled(upstream)
    # other weights (each split's SSL-E) get their own features; beyond POOLED_KEPT the least recently used go
    others = []
    for k in range(POOLED_KEPT):
        other = Upstream(UpstreamConfig(name="tiny"))
        with torch.no_grad():
            other.model.model.encoder.layers[0].fc1.weight.add_(0.1 * (k + 1))  # the transformer, not the conv encoder
        others.append(other)
        assert other.digest() != upstream.digest()
        theirs = pooled_for(other, ["u1"], shared).items["u1"]
        assert not torch.equal(theirs, shared.pooled(upstream).items["u1"])  # upstream: used last
    assert list(shared._pooled) == [others[-1].digest(), upstream.digest()]  # others[0] was dropped
