"""MetaICL pieces: episodes, shot ranges, UA_spk against scikit-learn, the paper's tables, training, the baselines."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score

from distmeta.speaker import baselines, episodes, evaluate, metaicl, tables
from distmeta.data.speakers import EMOTIONS, SpeakerData
from distmeta.features import FrameBank
from distmeta.models.speech_lm import SpeechLM, SpeechLMConfig, icl_llm_key

WORDS = SpeakerData(EMOTIONS).words


def test_evaluation_episodes_are_reproducible_and_cover_every_target(toy_speakers):
    data, _ = toy_speakers
    tasks = data.splits["test"]
    first = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=0)
    again = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=0)
    other = episodes.evaluation_episodes(tasks, 3, "TU+LD", seed=1)
    assert [(e.task.speaker, e.target, e.shots) for e in first] == [(e.task.speaker, e.target, e.shots) for e in again]
    assert [e.shots for e in first] != [e.shots for e in other]
    assert [(e.task.speaker, e.target) for e in first] == [(t.speaker, i) for t in tasks for i in range(len(t.utterances))]
    for e in first:
        assert e.target not in e.shots and len(set(e.task.labels[e.shots])) == 3
        assert e.utterances[-1] == e.task.utterances[e.target] and len(e.utterances) == 4
    with pytest.raises(ValueError, match="speaker 's7'"):  # 7 emotions, the target's excluded: TE+LD has 6 at most
        episodes.evaluation_episodes(tasks, 7, "TE+LD", seed=0)


def test_stage_enrollment_ranges():
    assert episodes.stage_enrollment("TU+LU", EMOTIONS, 7) == ("TU+LU", (0, 7), None)
    assert episodes.stage_enrollment("TO+LD", EMOTIONS, 5) == ("TO+LD", (5, 5), None)
    assert episodes.stage_enrollment("TO+LD", EMOTIONS[:4], 7) == ("TO+LD", (4, 4), None)  # LD: one pair per emotion at most
    assert episodes.stage_enrollment("Neutral", EMOTIONS, 7) == ("TU+LO", (0, 7), 0)
    assert episodes.stage_enrollment("stage1", EMOTIONS, 7)[1] == (0, 0)
    with pytest.raises(ValueError, match="TU\\+LX"):
        episodes.stage_enrollment("TU+LX", EMOTIONS, 7)


def test_ua_spk_is_the_mean_of_per_speaker_accuracies():
    rng = np.random.default_rng(0)
    speakers = pd.Series(np.repeat(["a", "b", "c"], [10, 4, 7]))
    label, prediction = rng.integers(0, 3, 21), rng.integers(0, 3, 21)
    stats = episodes.ua_spk(pd.Series(label == prediction), speakers)
    per_speaker = [accuracy_score(label[speakers == s], prediction[speakers == s]) for s in "abc"]
    assert stats["UA_spk"] == pytest.approx(np.mean(per_speaker))
    assert stats["std"] == pytest.approx(np.std(per_speaker)) and stats["median"] == pytest.approx(np.median(per_speaker))
    assert (stats["max"], stats["min"], stats["speakers"]) == (max(per_speaker), min(per_speaker), 3)
    # not the pooled accuracy (speakers of different sizes)
    assert stats["UA_spk"] != pytest.approx(accuracy_score(label, prediction))


def fake_results():
    """Results rows for hand-computable tables: speaker x's accuracy in a condition is given, y's is 1 - it."""
    rows = []

    def add(model, training, setting, emotion, k, accuracy_x):
        for speaker, accuracy in (("x", accuracy_x), ("y", 1 - accuracy_x)):
            for i in range(4):
                rows.append({"model": model, "training": training, "setting": setting, "emotion": emotion, "k": k,
                             "speaker": speaker, "utterance": f"{speaker}{i}", "label": "Joy", "prediction": "Joy",
                             "correct": i < round(accuracy * 4)})
    add("Pretrained", "", "", "", 0, 0.5)
    add("0-shot", "stage1", "", "", 0, 0.75)
    add("Proposed", "TU+LU", "", "", 0, 0.25)
    for k in (1, 2):
        add("Proposed", "TU+LU", "TU+LD", "", k, 0.5)
        add("Proposed", "TU+LU", "TE+LU", "", k, 1.0)
        add("Proposed", "TU+LU", "TU+LO", "neutral", k, 0.25 * k)
        add("Proposed (TO+LD_7)", "TO+LD", "TU+LD", "", k, 0.75)
        add("Proposed (TO+LD_7)", "TO+LD", "TU+LO", "neutral", k, 0.0)
    return pd.DataFrame(rows)


def test_tables_follow_the_results():
    results = fake_results()
    two = tables.table2(results)
    assert list(two.index) == ["Pretrained", "0-shot", "Proposed", "Proposed", "Proposed"]
    assert list(two["ICL"]) == ["-", "-", "0-shot", "1-shot", "2-shot"]
    assert two["UA_spk"].tolist() == pytest.approx([0.5] * 5)  # (a + 1 - a) / 2
    assert two["std"].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.0, 0.0])
    assert two["max"].tolist() == pytest.approx([0.5, 0.75, 0.75, 0.5, 0.5])
    three = tables.table3(results, WORDS, EMOTIONS)
    assert list(three.index) == ["1-shot", "2-shot"] and three.loc["1-shot", "TE+LU"] == pytest.approx(0.5)
    assert "TU+LO Neutral" in three.columns and three["TE+LD"].isna().all()
    four = tables.table4(results)
    assert list(four.index) == ["TU+LD / TU+LU", "TU+LO (Neutral) / TU+LU", "TU+LD / TO+LD", "TU+LO (Neutral) / TO+LD"]
    assert list(four.columns) == ["1-shot", "2-shot"]


def test_paired_comparisons_are_per_speaker_differences_with_scipys_interval():
    """Five speakers with known accuracies: Proposed at k=2 (TU+LD, the largest k) minus k=0, and minus
    Pretrained; the other settings (TE+LU) and models absent (MAML, Personalized_A) stay out."""
    from scipy import stats

    rng = np.random.default_rng(0)
    accuracy = {("Pretrained", 0, ""): rng.integers(0, 9, 5), ("Proposed", 0, ""): rng.integers(0, 9, 5),
                ("Proposed", 2, "TU+LD"): rng.integers(0, 9, 5), ("Proposed", 2, "TE+LU"): np.full(5, 8)}
    rows = [{"model": model, "training": "", "setting": setting, "emotion": "", "k": k, "speaker": f"s{j}",
             "utterance": f"s{j}_{i}", "label": "Joy", "prediction": "Joy", "correct": i < hits[j]}
            for (model, k, setting), hits in accuracy.items() for j in range(5) for i in range(8)]
    table = tables.paired(pd.DataFrame(rows))
    assert list(table.index) == ["Proposed (2 pairs) - Proposed (0 pairs)", "Proposed (0 pairs) - Pretrained"]
    for name, (mine, theirs) in zip(table.index, [(("Proposed", 2, "TU+LD"), ("Proposed", 0, "")),
                                                 (("Proposed", 0, ""), ("Pretrained", 0, ""))]):
        diff = (accuracy[mine] - accuracy[theirs]) / 8
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        row = table.loc[name]
        assert row["mean"] == pytest.approx(diff.mean()) and row["speakers"] == 5 and row["gains"] == (diff > 0).sum()
        assert (row["low"], row["high"]) == pytest.approx((low, high))


def test_conditions_cover_the_papers_tables():
    config = evaluate.EvaluationConfig(max_lo_shots=4)
    main = evaluate.conditions("TU+LU", 7, 7, config)
    assert ("", "", 0) in main and ("TO+LD", "", 7) in main and ("TU+LD", "", 6) in main and ("TU+LD", "", 7) not in main
    for setting in ("TU+LU", "TE+LD", "TE+LU"):
        assert {k for s, _, k in main if s == setting} == set(range(1, 7))
    assert {k for s, e, k in main if s == "TU+LO" and e == "*"} == {1, 2, 3, 4}
    ablation = evaluate.conditions("Neutral", 7, 7, config)
    assert {(s, e) for s, e, _ in ablation} == {("TU+LD", ""), ("TO+LD", ""), ("TU+LO", "neutral")}
    assert evaluate.conditions("stage1", 7, 7, config) == [("", "", 0)]


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


def test_personalized_baseline_references(toy_speakers):
    data, _ = toy_speakers
    rng = np.random.default_rng(0)
    for episode in baselines.reference_episodes(data.splits["test"], "all", EMOTIONS, rng):
        assert episode.target not in episode.shots
        assert list(episode.task.labels[episode.shots]) == list(range(len(EMOTIONS)))  # one per emotion, in order
    for episode in baselines.reference_episodes(data.splits["test"], "neutral", EMOTIONS, rng):
        assert len(episode.shots) == 1 and episode.task.labels[episode.shots[0]] == 0 and episode.target not in episode.shots


def test_classifier_baseline_beats_chance_on_toy_speakers(toy_speakers):
    data, bank = toy_speakers
    model, _ = baselines.train_classifier("Pretrained", bank, data, baselines.ClassifierConfig(epochs=30, batch_size=16, lr=1e-2),
                                          log=None)
    results = baselines.evaluate_classifier("Pretrained", model, bank, data, seed=0)
    assert len(results) == sum(len(t.utterances) for t in data.splits["test"])
    assert episodes.ua_spk(results["correct"], results["speaker"])["UA_spk"] > 0.6  # chance: 1/7


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
def test_ray_train_worker_killed_mid_training_resumes_from_its_checkpoint(tmp_path, speaker_corpus):
    """SIGKILL the Ray Train worker after its first checkpoint: FailureConfig restarts the worker group, which
    continues from the checkpoint (not from step 0) and still writes the model."""
    import json
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    from distmeta.models.upstream import UpstreamConfig

    data, corpus = speaker_corpus
    upstream = UpstreamConfig(name="fbank")
    meta = metaicl.MetaICLConfig(stage1_steps=300, stage2_steps=1, val_every=20, val_episodes=8, batch_size=4)
    model = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
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
    finally:
        ray.shutdown()
    assert killed is not None, "no checkpoint appeared before training ended"
    sidecar = json.loads(outcome["paths"]["stage1"].with_suffix(".json").read_text())
    assert sidecar["resumed_from_step"] >= 20 and sidecar["resumed_from_step"] % 20 == 0
    assert sidecar["best_step"] > 0 and outcome["paths"]["stage1"].is_file()
    assert "use_gpu" not in sidecar["settings"]["meta"]  # the same run on GPUs reuses this model
    stamp = outcome["paths"]["stage1"].stat().st_mtime_ns
    again = metaicl.metaicl_train_many(data, upstream, -1, model, meta, [], frames, tmp_path / "models")  # Ray is down:
    assert again == outcome["paths"] and again["stage1"].stat().st_mtime_ns == stamp  # a saved model is only reused


@pytest.mark.slow
def test_stage_2_trainings_side_by_side_equal_those_of_one_run(tmp_path, speaker_corpus):
    """meta.parallel=2: once stage 1 is saved, the stage-2 trainings run in two Ray Train runs side by side,
    each starting from the saved stage-1 model; every model equals the one-run (parallel=1) model's. As each
    run ends, `on_run_done` hears how many still train (what the job waits for to use a freed core)."""
    import shutil

    import ray
    from safetensors.torch import load_file

    from distmeta.models.upstream import UpstreamConfig

    data, corpus = speaker_corpus
    upstream = UpstreamConfig(name="fbank")
    # one CPU per worker in both layouts, so each model computes with the same thread count
    meta = metaicl.MetaICLConfig(stage1_steps=10, stage2_steps=10, val_every=5, val_episodes=4, batch_size=4,
                                 cpus_per_worker=1, parallel=1)
    model = SpeechLMConfig(llm="tiny", num_queries=2, qformer_dim=16, max_shots=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        frames = metaicl.frame_bank(corpus, upstream, -1, tmp_path / "models")
        heard = {"one": [], "two": []}
        one = metaicl.metaicl_train_many(data, upstream, -1, model, meta, ["TU+LU", "Neutral1"], frames, tmp_path / "one",
                                         on_run_done=heard["one"].append)
        (tmp_path / "two").mkdir()
        for path in (one["stage1"], one["stage1"].with_suffix(".json")):  # stage 1 saved: its run is skipped
            shutil.copy(path, tmp_path / "two" / path.name)
        two = metaicl.metaicl_train_many(data, upstream, -1, model, meta.__class__(**{**meta.__dict__, "parallel": 2}),
                                         ["TU+LU", "Neutral1"], frames, tmp_path / "two", on_run_done=heard["two"].append)
    finally:
        ray.shutdown()
    assert heard == {"one": [0], "two": [1, 0]}  # one run of everything; two runs of stage 2, one ending first
    assert list(one) == list(two) == ["stage1", "TU+LU", "Neutral1"]
    assert one["TU+LU"].name == two["TU+LU"].name  # parallel is not part of a model's cache key
    for training in ("TU+LU", "Neutral1"):
        a, b = load_file(str(one[training])), load_file(str(two[training]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), training
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
