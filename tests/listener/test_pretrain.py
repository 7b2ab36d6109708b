"""Pretraining through Ray Train equals the same training done serially in process."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distmeta.data import rotation
from distmeta.data.sources import DataConfig
from distmeta.features import AudioBank, PooledBank, input_bank
from distmeta.models import tiny_wavlm
from distmeta.models.upstream import UpstreamConfig, build_name
from distmeta.listener import pretrain
from distmeta.listener.pretrain import PretrainConfig, build_model, pretrain_many, training_rows
from distmeta.training.fit import fit


def test_training_rows_hold_out_whole_utterances(small_corpus):
    split = rotation(small_corpus, "unseen")[0]
    for kind in ("ssl_e", "multi"):
        parts = training_rows(small_corpus, split, kind, 0.1, 0)
        assert not set(parts["train"][0]) & set(parts["val"][0])
        assert set(small_corpus.utterances.loc[parts["train"][0] + parts["val"][0], "session"]) == {1, 2, 3, 4}
    multi = training_rows(small_corpus, split, "multi", 0.1, 0)
    assert multi["train"][2].max().item() == len(split.train_annotators) - 1
    agg = training_rows(small_corpus, split, "ssl_e", 0.1, 0)
    assert np.allclose(agg["train"][1].sum(1), 1)  # vote distributions


def test_a_new_tiny_pretrained_recipe_is_a_new_cache_key(small_corpus, monkeypatch):
    """A model trained on an older build of `tiny_pretrained` (same upstream config) is not reused."""
    split, config = rotation(small_corpus, "unseen")[0], UpstreamConfig(name="tiny_pretrained")

    def settings():
        return pretrain._settings("ssl_e", DataConfig(), config, split, PretrainConfig(), "corpus")
    before = settings()
    monkeypatch.setattr(tiny_wavlm, "PRETRAINING_VERSION", tiny_wavlm.PRETRAINING_VERSION + 1)
    assert settings()["upstream"] == before["upstream"] and settings() != before
    assert build_name(config).startswith("tiny_wavlm_pretrained_") and build_name(UpstreamConfig(name="fbank")) == ""


@pytest.mark.slow
def test_ray_train_equals_serial_and_reruns_are_skipped(small_corpus, tmp_path, ray_local):
    data = DataConfig(path=str(tmp_path / "corpus"), seed=3, n_utterances=300)
    small_corpus.save(data.path)  # the driver loads the same corpus (a cache hit: same seed and size)
    split = rotation(small_corpus, "unseen")[0]
    config = PretrainConfig(epochs=2, seed=5)
    requests = [(kind, data, UpstreamConfig(), split, config, tmp_path / f"{kind}.safetensors") for kind in ("ssl_e", "linear", "multi")]
    paths = pretrain_many(requests, str(tmp_path / "ray"))
    sidecar = json.loads(paths[1].with_suffix(".json").read_text())
    assert sidecar["settings"]["kind"] == "linear" and sidecar["best"]["epoch"] in (1, 2)
    assert sidecar["settings"]["corpus"] == small_corpus.fingerprint()  # other audio or labels: not reused
    assert "use_gpu" not in sidecar["settings"]["pretrain"]  # the same run on GPUs reuses these models
    assert sidecar["settings"]["pretrain"]["length_buckets"] is False  # random batches unless asked (docs/listener.md)

    # the same linear training, serially in this process
    torch.manual_seed(config.seed)
    parts = training_rows(small_corpus, split, "linear", config.val_fraction, config.seed)
    model = build_model("linear", UpstreamConfig())
    audio = AudioBank(small_corpus, small_corpus.utterances.index, config.max_seconds)
    bank = PooledBank(model.upstream, input_bank(model.upstream, audio))
    make = lambda part: lambda idx: bank.batch([parts[part][0][i] for i in idx])  # noqa: E731
    serial = fit(model, make("train"), parts["train"][1], parts["val"][1], make("val"), epochs=config.epochs,
                 batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, log=None)
    distributed = load_file(str(paths[1]))
    for name, value in serial["best_state"].items():
        assert torch.allclose(distributed[name], value, atol=1e-5), name

    stamp = [p.stat().st_mtime_ns for p in paths]
    pretrain_many(requests, str(tmp_path / "ray"))  # already done: nothing retrains
    assert [p.stat().st_mtime_ns for p in paths] == stamp


def test_multi_head_routes_each_row_to_its_annotators_head():
    from distmeta.listener.pretrain import MultiHeadSER
    from distmeta.models.upstream import Upstream

    torch.manual_seed(0)
    model = MultiHeadSER(Upstream(UpstreamConfig()), 3)
    hidden, frames = torch.randn(3, 4, 6, 64), torch.tensor([6, 5, 4, 6])
    task = torch.tensor([2, 0, 2, 1])
    pooled = torch.stack([hidden[:, i, :n].mean(1) for i, n in enumerate(frames.tolist())], dim=1)
    logits = model({"pooled": pooled, "task": task})
    for i, h in enumerate(task.tolist()):
        expected = model.heads[h](hidden[:, i:i + 1], frames[i:i + 1])[0]
        assert torch.allclose(logits[i], expected, atol=1e-6)


def test_ssl_e_fit_on_the_device_equals_the_cpus(small_corpus, device, assert_near):
    """SSL-E's training loop (`fit`, the whole model on cached conv features) on `--device` and on the CPU."""
    split = rotation(small_corpus, "unseen")[0]
    parts = training_rows(small_corpus, split, "ssl_e", 0.1, 0)
    ids = {"train": parts["train"][0][:24], "val": parts["val"][0][:12]}
    targets = {"train": parts["train"][1][:24], "val": parts["val"][1][:12]}
    torch.manual_seed(0)
    model = build_model("ssl_e", UpstreamConfig())
    bank = input_bank(model.upstream, AudioBank(small_corpus, ids["train"] + ids["val"]))
    make = lambda part: lambda idx: bank.batch([ids[part][i] for i in idx])  # noqa: E731
    results = {where: fit(model.clone().to(where), make("train"), targets["train"], targets["val"], make("val"),
                          epochs=2, batch_size=8, lr=1e-3, weight_decay=0.0, seed=0, log=None)
               for where in ("cpu", device)}
    assert_near(results[device]["best_state"], results["cpu"]["best_state"], what="SSL-E state ")
    for ours, reference in zip(results[device]["history"], results["cpu"]["history"]):
        assert ours == pytest.approx(reference, rel=1e-4)
