"""MAML on speaker tasks: the listener path's meta-learner on Ray task actors equals its serial run; test-time
adaptation reads exactly the speech LM's enrollment pairs; the MAML rows of Table II."""

import numpy as np
import pytest
import torch

from distmeta.meta.actors import ActorConfig, ActorPool
from distmeta.meta.learner import MetaConfig
from distmeta.models.speaker_classifier import SpeakerClassifier
from distmeta.speaker import maml, tables
from distmeta.speaker.episodes import evaluation_episodes, table2_conditions, ua_spk

CONFIG = MetaConfig(scope="entire", csmt=False, inner_lr=0.5, inner_steps=2, outer_lr=1e-2, outer_steps=6, shots=3,
                    tasks_per_step=3, test_steps=10, val_every=3, val_shots=3, val_seeds=1, val_queries=6,
                    da_first_order_fraction=0.5, val_steps=10)


@pytest.fixture(scope="module")
def toy(toy_speakers):
    data, bank = toy_speakers
    torch.manual_seed(0)
    return data, bank, SpeakerClassifier(bank.dim, len(data.emotions))


@pytest.fixture(scope="module")
def serial(toy):
    data, bank, start = toy
    return maml.meta_train(bank, data, start, CONFIG, log=None)


def assert_same(a, b, atol=1e-5):  # float noise: actors run torch with other thread counts
    assert a[1]["best_step"] == b[1]["best_step"]
    assert np.allclose([h["outer_loss"] for h in a[1]["history"]], [h["outer_loss"] for h in b[1]["history"]], atol=atol)
    for key, value in a[0].state_dict().items():
        assert torch.allclose(value, b[0].state_dict()[key], atol=atol), key


def test_speaker_tasks_are_the_listener_paths_tasks(toy):
    data, _, _ = toy
    task = maml.as_task(data.splits["train"][0], len(data.emotions))
    assert task.annotator == "s0" and task.targets.shape == (21, 7)
    assert (task.targets.argmax(1) == data.splits["train"][0].labels).all() and (task.targets.sum(1) == 1).all()


@pytest.mark.slow
def test_maml_on_speaker_task_actors_equals_the_serial_run(toy, serial, ray_local):
    data, bank, start = toy
    pool = ActorPool(ActorConfig(), log=None)  # one actor per training speaker
    try:
        assert_same(maml.meta_train(bank, data, start, CONFIG, actors=pool, log=None), serial)
        assert len(pool.actors) == len(data.splits["train"]) == 5
        assert len(pool.last_metrics) == 5 and len({m["loss"] for m in pool.last_metrics.values()}) > 1
        pool.config.max_actors = 2  # fewer actors than speakers: each holds several (0, 2, 4 and 1, 3)
        assert_same(maml.meta_train(bank, data, start, CONFIG, actors=pool, log=None), serial)
        assert pool.annotators == ["s0, s2, s4", "s1, s3"]
    finally:
        pool.shutdown()
    # meta-training moved the classifier and kept the best validation step
    assert serial[1]["best_step"] in (3, 6)
    assert any(not torch.equal(v, start.state_dict()[k[len("model."):]]) for k, v in serial[0].state_dict().items()
               if k.startswith("model."))


def test_evaluation_adapts_on_the_speech_lms_enrollment_pairs(toy, serial):
    data, bank, _ = toy
    meta = serial[0]
    rows = maml.evaluate(meta, bank, data, CONFIG, seed=5, log=None)
    assert sorted(set(zip(rows["setting"], rows["k"]))) == sorted(table2_conditions(7))
    for setting, k in [("TU+LD", 3), ("TO+LD", 7)]:
        episodes = evaluation_episodes(data.splits["test"], k, setting, seed=5)  # what the speech LM reads
        part = rows[(rows["setting"] == setting) & (rows["k"] == k)]
        assert list(part["utterance"]) == [e.task.utterances[e.target] for e in episodes]
        e = episodes[4]  # its prediction: adapt on exactly its pairs with the learned rates, then classify
        eye = np.eye(7, dtype=np.float32)
        fast = meta.adapt(bank.batch([e.task.utterances[i] for i in e.shots]), torch.as_tensor(eye[e.task.labels[e.shots]]),
                          CONFIG.test_steps)
        expected = data.words[int(meta(bank.batch([e.task.utterances[e.target]]), fast).argmax())]
        assert part["prediction"].iloc[4] == expected
    zero = rows[rows["k"] == 0]
    with torch.no_grad():
        logits = meta(bank.batch(list(zero["utterance"])))
    assert list(zero["prediction"]) == [data.words[i] for i in logits.argmax(-1).tolist()]
    # the toy speakers are learnable: every emotion once (TO+LD) is far above chance (1/7)
    assert ua_spk(rows[rows["k"] == 7]["correct"], rows[rows["k"] == 7]["speaker"])["UA_spk"] > 0.5

    two = tables.table2(rows)
    assert list(two.index) == ["MAML"] * 8 and list(two["ICL"]) == [f"{k}-shot" for k in range(8)]
    assert two["UA_spk"].iloc[7] == pytest.approx(ua_spk(rows[rows["k"] == 7]["correct"], rows[rows["k"] == 7]["speaker"])["UA_spk"])
