"""MetaICL: training, saved speech LMs, the frame bank, the Ray Train runs (a killed worker resumes; runs side by side equal one run's), the device."""

import json

import numpy as np
import pytest
import torch

from distmeta.features import FrameBank
from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig, icl_llm_key
from distmeta.speaker import episodes, evaluate, metaicl


def test_metaicl_training_lowers_validation_loss_and_the_state_round_trips(tmp_path, toy_speakers):
    """A few hundred MetaICL steps on toy speakers lower the validation loss; the best trainable
    state reloads into a fresh model with identical predictions."""
    data, bank = toy_speakers
    config = metaicl.MetaICLConfig(batch_size=8, val_every=40, lr=3e-3)
    model_config = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=3)
    model = SpeechLM(model_config, bank.dim, data.words)
    val = episodes.random_episodes(data.splits["valid"], 32, "TU+LU", (0, 3), np.random.default_rng(1))
    before = metaicl.validation_loss(model, bank, val, data.words, 32)
    best = metaicl.train_stage(model, bank, data.splits["train"], val, data.words, steps=120, setting="TU+LU", shots=(0, 3),
                               emotion=None, config=config, log=None)
    assert best["val_loss"] < 0.7 * before and best["step"] > 0
    assert set(best["state"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = metaicl.load_trainable(SpeechLM(model_config, bank.dim, data.words), best["state"]).eval()
    model.load_state_dict(best["state"], strict=False)
    test_episodes = episodes.evaluation_episodes(data.splits["test"], 2, "TU+LU", seed=0)
    assert evaluate.predict(fresh, bank, test_episodes, data.words) == evaluate.predict(model.eval(), bank, test_episodes, data.words)
    with pytest.raises(ValueError, match="missing"):
        metaicl.load_trainable(SpeechLM(model_config, bank.dim, data.words), {})


def test_each_stage_decays_its_rate_along_a_cosine_and_a_resumed_stage_continues_the_curve(toy_speakers):
    data, bank = toy_speakers
    config = metaicl.MetaICLConfig(batch_size=2, val_every=100, lr=2e-3, lr_floor=0.1)
    assert metaicl.stage_lr(config, 0, 10) == pytest.approx(2e-3) and metaicl.stage_lr(config, 10, 10) == pytest.approx(2e-4)
    assert metaicl.stage_lr(config, 5, 10) == pytest.approx(1.1e-3)  # halfway: the mean of the two ends
    assert metaicl.stage_lr(metaicl.MetaICLConfig(lr=2e-3, lr_floor=1.0), 7, 10) == pytest.approx(2e-3)  # constant
    model = SpeechLM(SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=3), bank.dim, data.words)
    optimizer = metaicl.make_optimizer(model, config)
    seen = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    val = episodes.random_episodes(data.splits["valid"], 2, "TU+LU", (0, 3), np.random.default_rng(1))
    metaicl.train_stage(model, bank, data.splits["train"], val, data.words, steps=10, setting="TU+LU", shots=(0, 3),
                        emotion=None, config=config, start_step=7, optimizer=optimizer, log=None)  # resumed after step 7
    assert seen == pytest.approx([metaicl.stage_lr(config, s, 10) for s in (8, 9, 10)])


def test_a_speech_lm_saved_before_the_word_tokenizer_loads_with_bytes(tmp_path):
    """Sidecars written before `model.tokenizer` existed have no such key: those models read bytes, and
    their token embeddings (ByT5's vocabulary) must load into a byte-level model, not the word default."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    words = ["Neutral", "Anger"]
    config = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=2, tokenizer="bytes", binding="position",
                            train_token_embeddings=True)
    old = SpeechLM(config, 12, words)
    save_file(metaicl.trainable_state(old), str(tmp_path / "old.safetensors"))
    settings = {k: v for k, v in asdict(config).items() if k not in ("tokenizer", "binding")}  # keys that came later
    (tmp_path / "old.json").write_text(json.dumps({"settings": {"model": settings}, "encoder_dim": 12, "words": words}))
    loaded = metaicl.load_speech_lm(tmp_path / "old.safetensors")
    assert loaded.config.tokenizer == "bytes" and loaded.label_ids("Anger") == old.label_ids("Anger")
    assert loaded.config.binding == "position"  # before the binding: the paper's position embedding alone
    for name, value in metaicl.trainable_state(old).items():
        torch.testing.assert_close(metaicl.trainable_state(loaded)[name], value)


def test_a_speech_lm_trained_on_another_llm_build_is_refused(tmp_path):
    """LoRA and the connector fit the LLM weights they were trained with: a sidecar naming another tiny_icl
    build (the in-context pretraining changed since) is an error naming the file, not a silent mismatch."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    config = SpeechLMConfig(qformer_dim=16, max_shots=2)
    model = SpeechLM(config, 12, ["Neutral", "Anger"])
    save_file(metaicl.trainable_state(model), str(tmp_path / "lm.safetensors"))
    sidecar = {"settings": {"model": asdict(config), "llm_build": "tiny_icl_00000000"}, "encoder_dim": 12,
               "words": ["Neutral", "Anger"]}
    (tmp_path / "lm.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="lm.safetensors.*tiny_icl_00000000"):
        metaicl.load_speech_lm(tmp_path / "lm.safetensors")
    sidecar["settings"]["llm_build"] = icl_llm_key(config)
    (tmp_path / "lm.json").write_text(json.dumps(sidecar))
    assert metaicl.load_speech_lm(tmp_path / "lm.safetensors").config == config


def test_frames_of_audio_changed_in_place_are_computed_again(tmp_path):
    import os

    import soundfile as sf

    from distmeta.data import make_synthetic_corpus
    from distmeta.models.upstream import UpstreamConfig

    corpus = make_synthetic_corpus(tmp_path / "corpus", seed=2, n_utterances=10, progress=False)
    first = metaicl.frame_bank(corpus, UpstreamConfig(name="fbank"), -1, tmp_path / "models")
    assert metaicl.frame_bank(corpus, UpstreamConfig(name="fbank"), -1, tmp_path / "models") == first  # reused
    utterance, path = corpus.utterances.index[0], corpus.utterances["path"].iloc[0]
    wav, rate = sf.read(path)
    sf.write(path, wav[::-1].copy(), rate)  # same size, other audio
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second = metaicl.frame_bank(corpus, UpstreamConfig(name="fbank"), -1, tmp_path / "models")
    assert second != first
    assert not torch.equal(FrameBank.load(second).items[utterance], FrameBank.load(first).items[utterance])


def registered_checkpoints(storage) -> int:
    """How many checkpoints Ray Train's controller has registered for the runs under `storage` (its snapshot)."""
    import json

    count = 0
    for snapshot in storage.glob("**/checkpoint_manager_snapshot.json"):
        try:
            count += len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (ValueError, KeyError):  # being written
            pass
    return count


@pytest.mark.slow
def test_ray_train_worker_killed_mid_training_resumes_from_its_checkpoint(tmp_path, speaker_corpus, ray_local):
    """SIGKILL the Ray Train worker after its first checkpoint: FailureConfig restarts the worker group, which
    continues from the checkpoint (not from step 0) and still writes the model."""
    import json
    import os
    import signal
    import threading
    import time

    import psutil

    from distmeta.models.upstream import UpstreamConfig

    data, corpus = speaker_corpus
    upstream = UpstreamConfig(name="fbank")
    meta = metaicl.MetaICLConfig(stage1_steps=300, stage2_steps=1, val_every=20, val_episodes=8, batch_size=4)
    model = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=2)
    frames = metaicl.frame_bank(corpus, upstream, -1, tmp_path / "models")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(paths=metaicl.metaicl_train_many(
        data, upstream, -1, model, meta, [], frames, tmp_path / "models")))
    started = time.time()
    thread.start()
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and thread.is_alive():
        # a checkpoint on disk is not yet one the restarted group gets: the controller registers it when it
        # next polls the worker, and then records it in its snapshot; kill only after that
        if registered_checkpoints(tmp_path / "models" / "ray") >= 1:
            # Ray titles each actor's process "ray::<class>...": the worker is the one running our loop, started
            # by this training (a lingering worker of an earlier test in the session must not be the one killed)
            workers = [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= started]
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "no checkpoint appeared before training ended"
    sidecar = json.loads(outcome["paths"]["stage1"].with_suffix(".json").read_text())
    assert sidecar["resumed_from_step"] >= 20 and sidecar["resumed_from_step"] % 20 == 0
    assert sidecar["best_step"] > 0 and outcome["paths"]["stage1"].is_file()
    assert "use_gpu" not in sidecar["settings"]["meta"]  # the same run on GPUs reuses this model
    stamp = outcome["paths"]["stage1"].stat().st_mtime_ns
    runs = sorted((tmp_path / "models" / "ray").iterdir())
    again = metaicl.metaicl_train_many(data, upstream, -1, model, meta, [], frames, tmp_path / "models")
    assert again == outcome["paths"] and again["stage1"].stat().st_mtime_ns == stamp  # a saved model is only reused:
    assert sorted((tmp_path / "models" / "ray").iterdir()) == runs  # no Ray Train run started


@pytest.mark.slow
def test_stage_2_trainings_side_by_side_equal_those_of_one_run_and_the_best_draw_is_kept(tmp_path, speaker_corpus, ray_local):
    """meta.parallel=2: once stage 1 is saved, the stage-2 trainings run in two Ray Train runs side by side,
    each starting from the saved stage-1 model; every model equals the one-run (parallel=1) model's. As each
    run ends, `on_run_done` hears how many still train (what the job waits for to use a freed core).
    meta.draws=2 (in the side-by-side runs): each setting trains twice on other episodes, the first draw
    is the one-draw model, and the draw with the lower validation loss is the one returned."""
    import shutil

    from safetensors.torch import load_file

    from distmeta.models.upstream import UpstreamConfig

    data, corpus = speaker_corpus
    upstream = UpstreamConfig(name="fbank")
    # one CPU per worker in both layouts, so each model computes with the same thread count
    meta = metaicl.MetaICLConfig(stage1_steps=10, stage2_steps=10, val_every=5, val_episodes=4, batch_size=4,
                                 cpus_per_worker=1, parallel=1, draws=1)
    model = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=2)
    frames = metaicl.frame_bank(corpus, upstream, -1, tmp_path / "models")
    heard = {"one": [], "two": []}
    one = metaicl.metaicl_train_many(data, upstream, -1, model, meta, ["TU+LU", "Neutral1"], frames, tmp_path / "one",
                                     on_run_done=heard["one"].append)
    (tmp_path / "two").mkdir()
    for path in (one["stage1"], one["stage1"].with_suffix(".json")):  # stage 1 saved: its run is skipped
        shutil.copy(path, tmp_path / "two" / path.name)
    two = metaicl.metaicl_train_many(data, upstream, -1, model, meta.__class__(**{**meta.__dict__, "parallel": 2, "draws": 2}),
                                     ["TU+LU", "Neutral1"], frames, tmp_path / "two", on_run_done=heard["two"].append)
    assert heard == {"one": [0], "two": [1, 0]}  # one run of everything; two runs of stage 2, one ending first
    assert list(one) == list(two) == ["stage1", "TU+LU", "Neutral1"]
    for training in ("TU+LU", "Neutral1"):
        first, second = metaicl.draw_paths((tmp_path / "two").resolve(), one[training].name.split("-")[1], training, 2)
        assert first.name == one[training].name  # neither parallel nor draws is part of a model's cache key
        a, b, c = (load_file(str(p)) for p in (one[training], first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), training
        assert not all(torch.equal(a[k], c[k]) for k in a), training  # the second draw read other episodes
        losses = [json.loads(p.with_suffix(".json").read_text())["best_val_loss"] for p in (first, second)]
        assert two[training] == (first, second)[int(losses[1] < losses[0])], (training, losses)
    runs = [p.name for p in (tmp_path / "two" / "ray").iterdir() if p.is_dir()]
    assert len(runs) == 2, runs  # one run per stage-2 training


def test_metaicl_training_and_prediction_on_the_device_equal_the_cpus(toy_speakers, device, assert_near):
    """MetaICL's `train_stage` and `evaluate.predict` with the speech LM on `--device` (the frame bank stays
    on the CPU) against the same run on the CPU: the losses, the trained state, the scores, the words."""
    data, bank = toy_speakers
    config = metaicl.MetaICLConfig(batch_size=8, val_every=10, lr=3e-3)
    model_config = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=3)
    val = episodes.random_episodes(data.splits["valid"], 16, "TU+LU", (0, 3), np.random.default_rng(1))
    test_episodes = episodes.evaluation_episodes(data.splits["test"], 2, "TU+LU", seed=0)
    torch.manual_seed(0)
    model = SpeechLM(model_config, bank.dim, data.words)
    results = {}
    for where in ("cpu", device):
        twin = SpeechLM(model_config, bank.dim, data.words)
        twin.load_state_dict(model.state_dict())
        twin.to(where)
        best = metaicl.train_stage(twin, bank, data.splits["train"], val, data.words, steps=20, setting="TU+LU",
                                   shots=(0, 3), emotion=None, config=config, device=where, log=None)
        twin.load_state_dict(best["state"], strict=False)
        with torch.no_grad():
            scores = twin.eval().score(*episodes.episode_batch(twin, bank, test_episodes, data.words, where))
        words = evaluate.predict(twin, bank, test_episodes, data.words, device=where)
        results[where] = best, scores, words
    (best, scores, words), (reference, reference_scores, reference_words) = results[device], results["cpu"]
    assert best["step"] == reference["step"] and best["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
    assert_near(best["state"], reference["state"], what="trained state ")
    assert_near(scores, reference_scores, what="label-word scores ")
    assert words == reference_words
