import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, hamming_loss

from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights, multilabel_scores


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 64, 9
    probs = rng.dirichlet(np.full(c, 0.5), size=n)
    targets = (rng.random((n, c)) < 0.15).astype(int)
    targets[np.arange(n), rng.integers(c, size=n)] = 1
    pred = (probs > 1 / c).astype(int)
    scores = multilabel_scores(torch.tensor(probs), targets)
    assert scores["maF1"] == pytest.approx(f1_score(targets, pred, average="macro", zero_division=0))
    assert scores["miF1"] == pytest.approx(f1_score(targets, pred, average="micro", zero_division=0))
    assert scores["UA"] == pytest.approx(1 - hamming_loss(targets, pred))


def test_absent_class_scores_zero_f1_not_skipped():
    # class 2 never appears and is never predicted: sklearn's zero_division=0 counts it as 0
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    assert multilabel_scores(probs, targets)["maF1"] == pytest.approx(2 / 3)


def test_uniform_random_scores_match_expectation():
    # a predictor blind to the input: UA and F1 follow from label and prediction rates alone
    rng = np.random.default_rng(0)
    n, c = 200_000, 9
    targets = (rng.random((n, c)) < 0.2).astype(int)
    probs = rng.dirichlet(np.ones(c), size=n)
    q = (1 - 1 / c) ** (c - 1)  # a Dirichlet(1) coordinate is Beta(1, C-1): P(X > 1/C)
    scores = multilabel_scores(probs, targets)
    assert scores["UA"] == pytest.approx(0.2 * q + 0.8 * (1 - q), abs=0.003)
    assert scores["miF1"] == pytest.approx(2 * 0.2 * q / (0.2 + q), abs=0.003)


def test_class_balanced_weights_follow_effective_number():
    targets = np.zeros((10, 3))
    targets[:6, 0] = 1
    targets[6:9, 1] = 1
    targets[9, 2] = 1
    beta = 0.9
    eff = np.array([(1 - beta**k) / (1 - beta) for k in (6, 3, 1)])
    expected = (1 / eff) * 3 / (1 / eff).sum()
    assert class_balanced_weights(targets).numpy() == pytest.approx(expected, rel=1e-5)
    assert class_balanced_weights(targets).sum().item() == pytest.approx(3.0)


def test_class_balanced_cross_entropy_against_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # multi-hot: normalised to [0, .5, .5]
    w = torch.tensor([0.5, 1.0, 1.5])
    logp = torch.log_softmax(logits, -1)
    item0 = 0.5 * -logp[0, 0]
    item1 = (0.5 * 1.0 + 0.5 * 1.5) * -(0.5 * logp[1, 1] + 0.5 * logp[1, 2])
    expected = (item0 + item1) / 2
    assert class_balanced_cross_entropy(logits, targets, w).item() == pytest.approx(expected.item())


def test_cross_entropy_gradient_matches_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(4, 9) < 0.3).double()
    targets[:, 0] = 1
    w = class_balanced_weights(targets).double()
    assert torch.autograd.gradcheck(lambda x: class_balanced_cross_entropy(x, targets, w), (logits,))
