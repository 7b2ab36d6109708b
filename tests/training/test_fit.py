import numpy as np
import pytest
import torch

from distmeta.metrics import class_balanced_weights
from distmeta.training.fit import _batches, evaluate_loss, fine_tune, fit


class DictLinear(torch.nn.Linear):
    """Takes the dict inputs fit() passes, like SERModel."""

    def __init__(self):
        super().__init__(5, 3)

    def forward(self, inputs):
        return super().forward(inputs["x"])


def test_fit_learns_and_keeps_the_best_validation_state():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(200, 5)), dtype=torch.float32)
    labels = (x[:, 0] > 0).long() * 2  # classes 0 and 2 of 3
    targets = torch.nn.functional.one_hot(labels, 3).float().numpy()
    torch.manual_seed(0)
    model = DictLinear()
    seen = []
    result = fit(model, lambda idx: {"x": x[:150][idx]}, targets[:150], targets[150:], lambda idx: {"x": x[150:][idx]},
                 epochs=8, batch_size=16, lr=0.05, weight_decay=0.0, seed=0, log=None,
                 on_epoch=lambda e, m, best, s: seen.append((m["val_loss"], best)))
    losses = [m["val_loss"] for m in result["history"]]
    assert losses[-1] < losses[0]
    assert result["best_val_loss"] == min(losses) and result["best_epoch"] == int(np.argmin(losses)) + 1
    assert [b for _, b in seen][0] is True
    model.load_state_dict(result["best_state"])
    accuracy = (model({"x": x[150:]}).argmax(1) == labels[150:]).float().mean()
    assert accuracy > 0.9


def test_length_buckets_cover_every_row_once_in_batches_of_similar_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(16_000, 70_000, size=1000)
    batches = _batches(1000, 32, np.random.default_rng(0), lengths)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))  # every row, once
    assert all(len(b) <= 32 for b in batches)
    # padding: each batch pads to its longest row; bucketed batches waste far less than random ones
    def padding(chosen):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in chosen)
    assert padding(batches) < 0.2 * padding(_batches(1000, 32, np.random.default_rng(0)))
    # still shuffled: another epoch's draw gives other batches, in another order
    again = _batches(1000, 32, np.random.default_rng(5), lengths)
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]
    assert np.corrcoef(np.arange(len(batches)), [lengths[b].mean() for b in batches])[0, 1] < 0.5


def test_evaluate_loss_does_not_depend_on_length_bucketing():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(90, 5)), dtype=torch.float32)
    targets = rng.dirichlet(np.ones(3), size=90).astype(np.float32)
    weights = class_balanced_weights(targets)
    model = DictLinear()
    plain = evaluate_loss(model, lambda idx: {"x": x[idx]}, targets, weights, batch_size=16)
    bucketed = evaluate_loss(model, lambda idx: {"x": x[idx]}, targets, weights, batch_size=16,
                             lengths=rng.integers(1, 100, size=90))
    assert bucketed == pytest.approx(plain, rel=1e-6)
    # the logits come back in row order, whatever order the length-sorted batches ran in
    _, logits = evaluate_loss(model, lambda idx: {"x": x[idx]}, targets, weights, batch_size=16,
                              lengths=rng.integers(1, 100, size=90), return_logits=True)
    assert torch.allclose(logits, model({"x": x}), atol=1e-6)


def test_val_score_picks_the_best_epoch_and_drives_patience():
    """A score to maximise replaces the validation loss: the kept state is the epoch the score liked best,
    even where the loss preferred another, and patience counts epochs without a better score."""
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(120, 5)), dtype=torch.float32)
    targets = torch.nn.functional.one_hot((x[:, 1] > 0).long(), 3).float().numpy()
    scores = iter([0.2, 0.5, 0.4, 0.3, 0.45, 0.9, 1.0])  # best at epoch 2; epochs 3-5 not better
    given = []

    def score(logits):
        given.append(logits)
        return next(scores)

    def run(**kw):
        torch.manual_seed(0)
        model = DictLinear()
        states = []
        result = fit(model, lambda idx: {"x": x[:90][idx]}, targets[:90], targets[90:], lambda idx: {"x": x[90:][idx]},
                     epochs=7, batch_size=16, lr=0.05, weight_decay=0.0, seed=0, log=None,
                     on_epoch=lambda e, m, best, s: states.append({k: v.clone() for k, v in s.items()}), **kw)
        return result, states

    result, states = run(val_score=score, patience=3)
    assert [m["val_score"] for m in result["history"]] == [0.2, 0.5, 0.4, 0.3, 0.45]  # stopped after 3 epochs without gain
    assert result["best_epoch"] == 2
    assert all(torch.equal(result["best_state"][k], states[1][k]) for k in states[1])
    assert result["best_val_loss"] == result["history"][1]["val_loss"]
    # the score reads each epoch's validation logits, in row order
    for logits, state in zip(given, states):
        model = DictLinear()
        model.load_state_dict(state)
        assert torch.allclose(logits, model({"x": x[90:]}), atol=1e-6)
    # a warm-up: epochs before min_epochs are neither kept nor counted by patience
    scores = iter([0.9, 0.2, 0.5, 0.4, 0.3, 0.45, 1.0])
    warmed, states = run(val_score=score, patience=3, min_epochs=2)
    assert [m["val_score"] for m in warmed["history"]] == [0.9, 0.2, 0.5, 0.4, 0.3, 0.45]
    assert warmed["best_epoch"] == 3 and all(torch.equal(warmed["best_state"][k], states[2][k]) for k in states[2])
    with pytest.raises(ValueError, match="min_epochs"):
        run(min_epochs=8)
    by_loss, _ = run()
    assert "val_score" not in by_loss["history"][0]
    assert by_loss["best_epoch"] == int(np.argmin([m["val_loss"] for m in by_loss["history"]])) + 1 != 2


def test_fine_tune_scoring_along_the_way_leaves_the_trajectory_as_it_was():
    """`on_step` sees every step and may predict in eval mode (benchmarks/bench_test_time.py): the next step
    still trains in train mode (dropout on), so the parameters end where a run without it ends."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(32, 5)), dtype=torch.float32)
    targets = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, 3, 32)), 3).float()

    class Dropped(DictLinear):
        def forward(self, inputs):
            return super().forward({"x": torch.nn.functional.dropout(inputs["x"], 0.5, self.training)})

    def run(on_step=None):
        torch.manual_seed(0)
        model = Dropped()
        return fine_tune(model, {"x": x}, targets, steps=4, lr=0.05, on_step=on_step)

    seen = []

    def score(step, model):
        model.eval()
        with torch.no_grad():
            seen.append((step, model({"x": x}).argmax(1)))

    plain, scored = run(), run(score)
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert scored.training
    for mine, theirs in zip(scored.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)
    torch.manual_seed(0)
    assert not torch.equal(Dropped().weight, plain.weight)  # it did train
