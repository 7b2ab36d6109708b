"""The speech encoder's pretraining: its Ray Train run equals the same training in this process, it reads no
test speaker, it is saved once and reused, and the frames the speaker path reads come from it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distmeta.data.audio import load_audio
from distmeta.data.speakers import speaker_view
from distmeta.io import settings_digest
from distmeta.models.speech_encoder import SpeechEncoder, SpeechEncoderConfig, log_mel
from distmeta.models.upstream import Upstream, UpstreamConfig
from distmeta.speaker import baselines, encoder
from distmeta.features import FrameBank
from distmeta.speaker.metaicl import frame_bank
from distmeta.training.fit import fit

pytestmark = pytest.mark.slow  # a Ray Train run and a generated corpus

CONFIG = encoder.EncoderPretrainConfig(SpeechEncoderConfig(dim=32, heads=2, ffn_dim=64), epochs=3, patience=0, batch_size=16)


@pytest.fixture(scope="module")
def pretrained(speaker_corpus, tmp_path_factory, ray_local):
    _, corpus = speaker_corpus
    data = speaker_view(corpus)
    models = tmp_path_factory.mktemp("encoder-models")
    upstream = encoder.ready_upstream(UpstreamConfig(name="speech_encoder"), CONFIG, corpus, data, models)
    return corpus, data, models, upstream


def test_ray_train_pretraining_equals_the_same_fit_in_process(pretrained):
    corpus, data, _, upstream = pretrained
    parts = {name: encoder.split_inputs(corpus, data.splits[name], 80, len(data.emotions)) for name in ("train", "valid")}
    torch.manual_seed(CONFIG.seed)
    model = encoder.EncoderSER(CONFIG.model, len(data.emotions))
    batches = {name: (lambda idx, name=name: encoder.mel_batch([parts[name][0][i] for i in idx])) for name in parts}
    result = fit(model, batches["train"], parts["train"][1], parts["valid"][1], batches["valid"], epochs=CONFIG.epochs,
                 batch_size=CONFIG.batch_size, lr=CONFIG.lr, weight_decay=CONFIG.weight_decay, seed=CONFIG.seed, log=None)
    saved = SpeechEncoder.load(upstream.path).state_dict()
    serial = {k.removeprefix("encoder."): v for k, v in result["best_state"].items() if k.startswith("encoder.")}
    assert saved.keys() == serial.keys()
    for key, value in serial.items():  # float noise: the Ray Train worker runs torch with its own thread count
        assert torch.allclose(saved[key], value, atol=1e-4), key
    whole = encoder.load_encoder_ser(upstream.path).state_dict()  # with its head: the Scratch baseline
    assert whole.keys() == result["best_state"].keys() and whole.keys() > {f"encoder.{k}" for k in serial}
    for key, value in result["best_state"].items():
        assert torch.allclose(whole[key], value, atol=1e-4), key
    sidecar = json.loads(Path(upstream.path).with_suffix(".json").read_text())
    assert sidecar["best"]["epoch"] == result["best_epoch"]
    assert np.isclose(sidecar["best"]["val_loss"], result["best_val_loss"], atol=1e-4)
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]  # it learns


def test_pretraining_reads_training_and_validation_speakers_only(pretrained):
    corpus, data, _, _ = pretrained
    train, _ = encoder.split_inputs(corpus, data.splits["train"], 80, len(data.emotions))
    assert len(train) == sum(len(t.utterances) for t in data.splits["train"])
    # the settings name the two splits' speakers; a corpus whose test speakers differ has another split
    settings = json.loads(Path(pretrained[3].path).with_suffix(".json").read_text())["settings"]
    assert settings["speakers"] == settings_digest({n: [t.speaker for t in data.splits[n]] for n in ("train", "valid")})


def test_a_saved_encoder_is_reused_and_its_frames_are_what_the_speaker_path_reads(pretrained):
    corpus, data, models, upstream = pretrained
    mtime = os.stat(upstream.path).st_mtime_ns
    again = encoder.ready_upstream(UpstreamConfig(name="speech_encoder"), CONFIG, corpus, data, models)  # Ray is down:
    assert again == upstream and os.stat(upstream.path).st_mtime_ns == mtime  # only reuse can succeed
    named = UpstreamConfig(name="speech_encoder", path="/somewhere/else.safetensors")  # a checkpoint the user names
    assert encoder.ready_upstream(named, CONFIG, corpus, data, models) == named
    assert encoder.ready_upstream(UpstreamConfig(name="fbank"), CONFIG, corpus, data, models).name == "fbank"
    bank = FrameBank.load(frame_bank(corpus, upstream, -1, models))
    utterance = data.splits["test"][0].utterances[0]
    wav = load_audio(corpus.utterances["path"][utterance])
    direct = SpeechEncoder.load(upstream.path)([wav])["hidden_states"][-1][0]
    assert torch.allclose(bank.items[utterance], direct, atol=1e-5)
    assert bank.dim == CONFIG.model.dim and Upstream(upstream).num_layers == CONFIG.model.layers + 1


def test_scratch_is_the_pretraining_model_predicting_each_test_utterance(pretrained):
    corpus, data, _, upstream = pretrained
    rows = baselines.evaluate_scratch(upstream.path, corpus, data)
    model = encoder.load_encoder_ser(upstream.path)
    paths, expected = corpus.utterances["path"], []
    with torch.no_grad():  # one utterance at a time, from its audio: the batched evaluation must not mix them
        for task in data.splits["test"]:
            for u in task.utterances:
                mel = log_mel(load_audio(paths[u]))
                expected.append(data.words[int(model(encoder.mel_batch([mel])).argmax())])
    assert list(rows["utterance"]) == [u for t in data.splits["test"] for u in t.utterances]
    assert list(rows["prediction"]) == expected and set(rows["model"]) == {"Scratch"}
    assert list(rows["label"]) == [data.words[i] for t in data.splits["test"] for i in t.labels]
