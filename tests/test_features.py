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
