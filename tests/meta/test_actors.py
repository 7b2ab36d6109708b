import numpy as np
import pytest
import torch

from distmeta.data import rotation
from distmeta.meta.actors import ActorConfig, ActorPool, FlatLayout
from distmeta.meta.learner import MetaConfig
from distmeta.listener.metatrain import build_meta_model, meta_train_split
from distmeta.models import UpstreamConfig

CONFIG = MetaConfig(ini=False, outer_steps=6, shots=8, val_every=3, val_seeds=1, val_queries=8, test_steps=3,
                    inner_steps=2, inner_lr=0.05, outer_lr=1e-2, da_first_order_fraction=0.5, tasks_per_step=3,
                    val_steps=3)


def test_flat_layout_round_trip_keeps_names_shapes_and_values():
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4), "rates.w": torch.rand(5)}
    layout = FlatLayout.of(tensors)
    flat = layout.flatten(tensors)
    assert flat.dtype == np.float32 and flat.shape == (12 + 4 + 5,)
    back = layout.unflatten(flat)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(KeyError, match="b"):
        layout.flatten({"w": tensors["w"], "rates.w": tensors["rates.w"]})


@pytest.fixture(scope="module")
def pool(ray_local):
    """One pool of actors for the tests that do not kill any (starting nine actors costs ~15 s on 2 cores)."""
    actors = ActorPool(ActorConfig(), log=None)
    yield actors
    actors.shutdown()


@pytest.fixture(scope="module")
def split(small_corpus):
    return rotation(small_corpus, "unseen")[0]


@pytest.fixture(scope="module")
def serial(small_corpus, split):
    return meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None)


def assert_same_training(a, b, atol=1e-5):  # float noise: actors run torch with other thread counts
    assert a["best_step"] == b["best_step"]
    assert np.allclose([h["outer_loss"] for h in a["history"]], [h["outer_loss"] for h in b["history"]], atol=atol)
    assert [h["second_order"] for h in a["history"]] == [h["second_order"] for h in b["history"]]
    for key in a["best_state"]:
        assert torch.allclose(a["best_state"][key], b["best_state"][key], atol=atol), (key, (a["best_state"][key] - b["best_state"][key]).abs().max())


@pytest.mark.slow
def test_distributed_meta_training_equals_the_serial_trainer(pool, small_corpus, split, serial):
    distributed = meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool)
    assert len(pool.actors) == len(split.train_annotators)
    assert len({m["loss"] for m in pool.last_metrics.values()}) > 1  # different tasks, different losses
    assert [h["second_order"] for h in serial["history"]] == [False] * 3 + [True] * 3  # DA switched mid-run
    assert_same_training(distributed, serial)
    # the same pool serves a second training (another variant) without new actors
    pids = pool.pids()
    again = meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool)
    assert pool.pids() == pids
    assert_same_training(again, serial)


@pytest.mark.slow
def test_entire_scope_with_audio_on_actors_equals_serial(pool, small_corpus, split):
    config = MetaConfig(ini=False, scope="entire", outer_steps=2, shots=4, val_every=2, val_seeds=1, val_queries=4,
                        test_steps=1, inner_steps=1, inner_lr=0.01, outer_lr=1e-3, tasks_per_step=2, da=False,
                        val_steps=1)
    reference = meta_train_split(small_corpus, split, UpstreamConfig(), None, config, max_seconds=2.0, log=None)
    distributed = meta_train_split(small_corpus, split, UpstreamConfig(), None, config, max_seconds=2.0, log=None, actors=pool)
    assert_same_training(distributed, reference)
    # the frozen conv encoder (its outputs cached) is not a meta-parameter: AdamW's weight decay left it alone,
    # so the job's shared conv-feature bank still serves the meta-trained model
    start = build_meta_model(UpstreamConfig(), None, config).state_dict()
    conv = [k for k in start if ".feature_extractor." in k]
    assert conv and all(torch.equal(reference["best_state"][k], start[k]) for k in conv)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(pool, small_corpus, split, serial, tmp_path):
    checkpoint = tmp_path / "meta.ckpt.safetensors"

    def interrupt(record):
        if record["step"] == 5:  # after the checkpoint at step 4, before the one at 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool,
                         checkpoint=checkpoint, checkpoint_every=2, on_step=interrupt)
    assert checkpoint.exists()
    lines = []
    resumed = meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=lines.append, actors=pool,
                               checkpoint=checkpoint, checkpoint_every=2, resume=True)
    assert "after step 4" in lines[0]
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    assert_same_training(resumed, serial)
    # a checkpoint written with other settings is refused, naming what differs
    with pytest.raises(ValueError, match="outer_lr"):
        meta_train_split(small_corpus, split, UpstreamConfig(), None, MetaConfig(**{**CONFIG.__dict__, "outer_lr": 0.5}),
                         log=None, checkpoint=checkpoint, resume=True)


@pytest.mark.slow
def test_chaos_kills_at_every_moment_and_both_trainings_equal_the_serial_one(ray_local, small_corpus, split, serial,
                                                                              tmp_path, monkeypatch):
    import json

    import psutil

    record = tmp_path / "chaos.jsonl"
    monkeypatch.setenv("DISTMETA_CHAOS", f"7:{record}")
    messages = []
    pool = ActorPool(ActorConfig(), log=messages.append)
    first = meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool)
    second = meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool)
    pool.shutdown()
    kills = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(k["moment"] for k in kills) == sorted(["setup", "step", "validation", "between splits"])
    assert not any(psutil.pid_exists(k["pid"]) and psutil.Process(k["pid"]).status() != psutil.STATUS_ZOMBIE
                   for k in kills)
    # each death was noticed at the call it hit, or for an idle actor at the next call that needed it
    deaths = [m for m in messages if " died " in m]
    for kill in kills:
        if kill["moment"] == "validation":
            later = [f"died in outer step {s}" for s in range(kill["step"] + 1, CONFIG.outer_steps + 1)] + ["died setting up"]
        else:
            later = ["died setting up" if kill["step"] is None else f"died in outer step {kill['step']}"]
        assert any(f"{kill['annotator']!r} {when}" in m for m in deaths for when in later), (kill, deaths)
    assert_same_training(first, serial)
    assert_same_training(second, serial)


@pytest.mark.slow
def test_a_pool_sized_beyond_the_cluster_uses_the_actors_it_holds_and_an_impossible_one_is_refused(ray_local, small_corpus,
                                                                                                   split, serial):
    """Nine tasks, one actor each asked, at 1.5 CPU an actor: the 2-CPU cluster holds one, so that one takes
    every task (before, eight actors stayed pending and the setup waited for them forever). An actor no node
    can hold is refused by name before anything starts."""
    messages = []
    pool = ActorPool(ActorConfig(num_cpus=1.5), log=messages.append)
    try:
        assert_same_training(meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=pool), serial)
        assert len(pool.actors) == 1 and "9 tasks on 1 actors" in messages[0]
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="ask for 1 GPU each, but no node of the Ray cluster has more than 0 GPU"):
        meta_train_split(small_corpus, split, UpstreamConfig(), None, CONFIG, log=None, actors=ActorPool(ActorConfig(num_gpus=1)))
