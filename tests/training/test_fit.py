import numpy as np
import torch

from distmeta.training.fit import fit


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
