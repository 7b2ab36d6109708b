import re

import numpy as np
import torch

from distmeta.data.synthetic.listeners import draw_speakers
from distmeta.models.tiny_wavlm import PRETRAINING_STREAM, build_tiny_checkpoint, pretrained_tiny_path
from distmeta.models.upstream import Upstream, UpstreamConfig


def test_pretrained_tiny_learns_both_workers_and_is_built_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTMETA_CACHE", str(tmp_path))
    config = UpstreamConfig(name="tiny_pretrained", pretrain_epochs=4, pretrain_utterances=128)
    upstream = Upstream(config)
    epochs = [tuple(map(float, m)) for m in re.findall(r"L1 ([\d.]+), prosody MSE ([\d.]+)", capsys.readouterr().out)]
    assert len(epochs) == 4
    assert epochs[-1][0] < 0.9 * epochs[0][0] and epochs[-1][1] < epochs[0][1]  # both losses fall
    path = pretrained_tiny_path(0, 4, 128)
    assert path.is_file() and torch.load(path, weights_only=True)["cfg"]["encoder_layers"] == 2
    built = path.stat().st_mtime_ns
    again = Upstream(config)  # reused, not rebuilt
    assert path.stat().st_mtime_ns == built and "upstream pretraining" not in capsys.readouterr().out
    random = torch.load(build_tiny_checkpoint(tmp_path / "random.pt"), weights_only=True)["model"]
    trained = again.model.model.state_dict()
    assert not torch.equal(trained["encoder.layers.0.fc1.weight"], random["encoder.layers.0.fc1.weight"])
    # the conv encoder trained too (the SER model keeps it frozen afterwards)
    assert not torch.equal(trained["feature_extractor.conv_layers.0.0.weight"], random["feature_extractor.conv_layers.0.0.weight"])
    assert upstream.num_layers == 3


def test_pretraining_speakers_are_not_a_corpus_speakers():
    corpus_voices = {s.f0 for seed in range(5) for s in draw_speakers(np.random.default_rng(seed)).values()}
    pretraining_voices = {s.f0 for s in draw_speakers(np.random.default_rng([0, PRETRAINING_STREAM])).values()}
    assert not corpus_voices & pretraining_voices
