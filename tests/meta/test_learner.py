"""The meta-learner and its outer loop (distmeta.meta.learner), on a tiny SER meta-model of the small corpus:
the DA schedule, CSMT batches, the outer step, tasks together, validation, model selection."""

import numpy as np
import pytest
import torch

from distmeta.listener.metatrain import build_meta_model
from distmeta.meta.learner import MetaConfig, MetaLearner, sample_batches, task_meta_gradient, task_meta_gradients, train_serial, validation_metrics
from distmeta.meta.maml import MetaModel
from distmeta.models import UpstreamConfig


def test_derivative_order_annealing_schedule():
    meta = MetaModel(torch.nn.Linear(2, 2), inner_steps=1, inner_lr=0.1)
    learner = MetaLearner(meta, MetaConfig(outer_steps=10, da_first_order_fraction=0.3))
    assert [learner.second_order(s) for s in range(10)] == [False] * 3 + [True] * 7
    learner = MetaLearner(meta, MetaConfig(outer_steps=10, da=False))
    assert all(learner.second_order(s) for s in range(10))


def test_csmt_shares_the_batch_and_the_classic_split_does_not(meta_setting):
    config, _, _, tasks, _ = meta_setting
    inner, outer = sample_batches(tasks[0], config, step=3, task_index=0)
    assert outer is None and len(inner) == config.shots
    classic = MetaConfig(**{**config.__dict__, "csmt": False})
    inner, outer = sample_batches(tasks[0], classic, step=3, task_index=0)
    assert len(outer) == config.shots and not set(inner) & set(outer)


def test_outer_step_is_adamw_on_the_averaged_meta_gradients(meta_setting):
    config, model, bank, tasks, _ = meta_setting
    learner = MetaLearner(model.clone(), config)
    results = [task_meta_gradient(learner.meta, bank, tasks[i], config, 0, i, True) for i in range(3)]
    assert {n for n in results[0][1] if n.startswith("rates.")}  # LSLR: the rates are meta-parameters too
    # independent: torch's AdamW on a copy, fed the mean of the three tasks' gradients
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in learner.meta.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(reference.values()), lr=config.outer_lr)
    for name, p in reference.items():
        p.grad = sum(g[name] for _, g in results) / 3
    optimizer.step()
    learner.outer_step([g for _, g in results])
    for name, p in learner.meta.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, reference[name], atol=1e-7), name


def test_task_meta_gradient_is_meta_gradients_on_the_sampled_batch(meta_setting):
    config, model, bank, tasks, _ = meta_setting
    learner = MetaLearner(model.clone(), config)
    loss, grads = task_meta_gradient(learner.meta, bank, tasks[1], config, 2, 1, False)
    idx, _ = sample_batches(tasks[1], config, 2, 1)
    batch = (bank.batch([tasks[1].utterances[i] for i in idx]), torch.as_tensor(tasks[1].targets[idx]))
    expected_loss, expected = learner.meta.meta_gradients(batch, steps=config.inner_steps, second_order=False)
    assert loss == pytest.approx(expected_loss.item())
    assert all(torch.equal(grads[k], expected[k]) for k in expected)


@pytest.mark.parametrize("csmt", [True, False])
def test_tasks_on_pooled_features_are_computed_together_with_the_same_numbers(meta_setting, csmt):
    from dataclasses import replace

    from distmeta.features import PooledBank

    config, model, bank, tasks, _ = meta_setting
    config = replace(config, csmt=csmt)
    assert isinstance(bank, PooledBank)  # scope head: the batched path
    # in float64: the two paths sum in different orders, and some gradients (the layer weights') are small
    # differences of large terms, so float32 rounding shows at ~1e-4 of their size
    model = model.clone().double()
    bank = bank.subset(bank.items)
    bank.items = {u: f.double() for u, f in bank.items.items()}
    chosen = [(i, tasks[i]) for i in (0, 2, 3)]
    for second_order in (False, True):
        together = task_meta_gradients(model, bank, chosen, config, 5, second_order)
        for (i, task), (loss, grads) in zip(chosen, together):
            expected_loss, expected = task_meta_gradient(model, bank, task, config, 5, i, second_order)
            assert loss == pytest.approx(expected_loss, rel=1e-12)
            assert set(grads) == set(expected)
            assert all(torch.allclose(grads[k], expected[k], rtol=1e-9, atol=1e-15) for k in expected), (i, second_order)


def test_validation_adapts_its_episodes_together_with_the_same_numbers(meta_setting):
    from distmeta.features import Bank

    config, model, bank, _, val_task = meta_setting

    class OneByOne(Bank):  # the same features behind another bank type: the per-episode path (audio, frames)
        items = bank.items
        batch = staticmethod(bank.batch)

    together = validation_metrics(model, bank, [val_task, val_task], config)
    alone = validation_metrics(model, OneByOne(), [val_task, val_task], config)
    assert together == pytest.approx(alone, rel=1e-5)


def test_validation_adapts_val_steps_with_the_rates_whatever_meta_test_takes(meta_setting):
    """Model selection adapts `val_steps` steps with the learned rates; `test_steps` is meta-test's alone
    (the default meta-tests with 10 fine-tuning steps but validates with 50 steps of the rates)."""
    from dataclasses import replace

    from distmeta.meta.learner import query_probs
    from distmeta.metrics import multilabel_scores

    config, model, bank, _, val_task = meta_setting
    config = replace(config, val_seeds=1, val_steps=config.test_steps + 2)  # apart, so the two cannot be confused
    support, query = val_task.sample(config.shots, config.val_queries, seed=10_000)
    fast = model.adapt(bank.batch([val_task.utterances[i] for i in support]),
                       torch.as_tensor(val_task.targets[support]), config.val_steps)
    expected = multilabel_scores(query_probs(model, bank, [val_task.utterances[i] for i in query], fast),
                                 torch.as_tensor(val_task.targets[query]))["maF1"]
    assert validation_metrics(model, bank, val_task, config)["val_maF1"] == pytest.approx(expected, rel=1e-5)
    other_test_steps = validation_metrics(model, bank, val_task, replace(config, test_steps=config.test_steps + 7))
    assert other_test_steps == validation_metrics(model, bank, val_task, config)


def test_serial_training_learns_rates_and_keeps_the_best_validation_state(meta_setting):
    config, model, bank, tasks, val_task = meta_setting
    learner = MetaLearner(model.clone(), config)
    start = {n: r.detach().clone() for n, r in learner.meta.learning_rates().items()}
    result = train_serial(learner, bank, tasks, val_task, log=None)
    validated = [h for h in result["history"] if "val_loss" in h]
    assert [h["step"] for h in validated] == [2, 4]
    best = max(validated, key=lambda h: h["val_maF1"])  # the default selection; the first of equals
    assert result["best_step"] == best["step"] and result["best_val_loss"] == best["val_loss"]
    assert any(not torch.equal(start[n], r) for n, r in learner.meta.learning_rates().items())  # LSLR trained
    frozen_config = MetaConfig(**{**config.__dict__, "lslr": False})
    frozen = MetaLearner(build_meta_model(UpstreamConfig(), None, frozen_config), frozen_config)
    train_serial(frozen, bank, tasks, val_task, log=None)
    assert all(torch.equal(start[n], r) for n, r in frozen.meta.learning_rates().items())


def test_selection_on_validation_macro_f1_keeps_the_state_of_its_best_step(meta_setting):
    """meta.select=maF1: the kept meta-parameters are those after the step whose validation macro-F1 was
    highest (the earliest on ties), as a run stopped at that step ends with; loss keeps the lowest loss."""
    from dataclasses import replace

    config, model, bank, tasks, val_task = meta_setting
    config = replace(config, outer_steps=8, val_every=1, select="maF1")
    learner, states = MetaLearner(model.clone(), config), []
    result = train_serial(learner, bank, tasks, val_task, log=None, on_step=lambda record: states.append(learner.state()))
    scores = [h["val_maF1"] for h in result["history"]]
    losses = [h["val_loss"] for h in result["history"]]
    assert result["best_step"] == int(np.argmax(scores)) + 1
    assert result["best_step"] != int(np.argmin(losses)) + 1  # here the two criteria disagree, so this tells them apart
    kept = states[result["best_step"] - 1]
    assert set(kept) == set(result["best_state"]) and all(torch.equal(result["best_state"][k], v) for k, v in kept.items())
    by_loss = train_serial(MetaLearner(model.clone(), replace(config, select="loss")), bank, tasks, val_task, log=None)
    assert by_loss["best_step"] == int(np.argmin(losses)) + 1
    with pytest.raises(ValueError, match="meta.select"):
        train_serial(MetaLearner(model.clone(), replace(config, select="UA")), bank, tasks, val_task, log=None)
