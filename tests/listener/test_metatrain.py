"""One split's Meta-PerSER meta-training (distmeta.listener.metatrain): reproducible, side by side in threads,
on the device."""

import numpy as np
import pytest
import torch

from distmeta.data import rotation
from distmeta.listener.metatrain import build_meta_model, make_bank, meta_train_split
from distmeta.meta.learner import MetaLearner, train_serial
from distmeta.models import UpstreamConfig


def test_meta_training_is_reproducible(small_corpus, meta_setting):
    config, *_ = meta_setting
    split = rotation(small_corpus, "unseen")[0]
    a = meta_train_split(small_corpus, split, UpstreamConfig(), None, config, log=None)
    b = meta_train_split(small_corpus, split, UpstreamConfig(), None, config, log=None)
    assert all(torch.equal(a["best_state"][k], b["best_state"][k]) for k in a["best_state"])
    assert np.allclose([h["outer_loss"] for h in a["history"]], [h["outer_loss"] for h in b["history"]])


def test_trainings_side_by_side_in_threads_equal_each_alone(small_corpus, meta_setting):
    """jobs/meta_train.py trains a split's variants in threads of one process (`parallel`): the global
    random state they seed from is taken in turns, so each training draws what it draws alone."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    config, *_ = meta_setting
    split = rotation(small_corpus, "unseen")[0]
    configs = [config, replace(config, csmt=False, seed=1)]

    def run(meta_config):
        return meta_train_split(small_corpus, split, UpstreamConfig(), None, meta_config, log=None)

    alone = [run(c) for c in configs]
    with ThreadPoolExecutor(2) as side_by_side:
        together = list(side_by_side.map(run, configs))
    for a, b in zip(alone, together):
        assert all(torch.equal(a["best_state"][k], b["best_state"][k]) for k in a["best_state"])
        assert [h["outer_loss"] for h in a["history"]] == [h["outer_loss"] for h in b["history"]]


@pytest.mark.parametrize("scope", ["head", "entire"])
def test_serial_training_on_the_device_equals_the_cpus(small_corpus, meta_setting, scope, device, assert_near):
    """The serial meta-trainer with the meta-model on `--device` (pooled features: every task in one vmap;
    scope entire: the upstream on cached conv features, task by task, second order through attention)."""
    from dataclasses import replace

    config, _, _, tasks, val_task = meta_setting
    config = replace(config, scope=scope, outer_steps=2, val_every=2, tasks_per_step=3, da_first_order_fraction=0.5)
    model = build_meta_model(UpstreamConfig(), None, config)
    pool = sorted({u for t in tasks for u in t.utterances} | set(val_task.utterances))
    bank = make_bank(model, small_corpus, pool, config, None)
    results = {}
    for where in ("cpu", device):
        learner = MetaLearner(model.clone().to(where), config)
        result = train_serial(learner, bank, tasks, val_task, log=None)
        results[where] = (learner.meta.state_dict(),
                          [h.get(key, 0.0) for h in result["history"] for key in ("outer_loss", "val_loss")])
    assert_near(results[device][0], results["cpu"][0], what="meta-trained state ")
    assert results[device][1] == pytest.approx(results["cpu"][1], rel=1e-4)
