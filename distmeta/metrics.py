"""Multi-label SER metrics and the class-balanced soft-target cross-entropy (Meta-PerSER's loss and metrics).

Metrics are computed over a whole evaluation set at once, never averaged over
batches: a class is predicted when its softmax probability exceeds 1/C.
"""

import numpy as np
import torch
import torch.nn.functional as F


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def predict(probs) -> np.ndarray:
    """Multi-hot predictions: probability > 1/C."""
    probs = _numpy(probs)
    return probs > 1.0 / probs.shape[1]


def multilabel_scores(probs, targets) -> dict:
    """{"maF1", "miF1", "UA"} in [0, 1] for probabilities [N, C] against multi-hot targets [N, C].

    maF1: mean over all C classes of binary F1 (a class with no true and no
    predicted positives scores 0). miF1: F1 of the pooled counts. UA: mean over
    classes of per-class binary accuracy, i.e. 1 - Hamming loss.
    """
    probs, targets = _numpy(probs), _numpy(targets)
    if probs.shape != targets.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be [N, C]")
    pred = predict(probs)
    true = targets > 0.5
    tp = (pred & true).sum(0)
    fp = (pred & ~true).sum(0)
    fn = (~pred & true).sum(0)
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = 2 * tp.sum() / micro_denom if micro_denom > 0 else 0.0
    return {"maF1": float(f1.mean()), "miF1": float(micro), "UA": float((pred == true).mean())}


def class_balanced_weights(targets, beta: float | None = None) -> torch.Tensor:
    """Per-class weights after Cui et al. (2019), from the training targets [N, C].

    A class counts an item when its target exceeds 1/C. beta defaults to
    (N-1)/N. A class with no items is weighted as if it had one. Weights sum to C.
    """
    # a copy: arrays from Ray's object store are read-only, which torch warns about on every view
    targets = torch.tensor(targets, dtype=torch.float64) if not torch.is_tensor(targets) else targets.double()
    n, c = targets.shape
    beta = (n - 1) / n if beta is None else beta
    counts = (targets > 1.0 / c).sum(0).clamp(min=1).double()
    if beta == 0:  # a single training item: every effective number is 1
        effective = torch.ones(c, dtype=torch.float64)
    else:
        effective = (1 - beta**counts) / (1 - beta)
    weights = 1.0 / effective
    return (weights * c / weights.sum()).float()


def class_balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Mean over items of w_i * CE(softmax(logits_i), t_i), with t_i = y_i / sum(y_i) and w_i = sum_c w_c t_ic.

    `targets` are multi-hot labels or vote distributions; rows are normalised to
    a distribution, so one labelled class and a vote share are treated alike.
    """
    return weighted_cross_entropy(logits, *balanced_targets(targets.to(logits.device, logits.dtype), class_weights))


def balanced_targets(targets: torch.Tensor, class_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of the class-balanced loss that depends on the targets alone: (t [N, C], w [N])."""
    soft = targets / targets.sum(-1, keepdim=True).clamp(min=torch.finfo(targets.dtype).tiny)
    return soft, soft @ class_weights.to(targets.device, targets.dtype)


def weighted_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
    """Mean over items of item_weight_i * CE(softmax(logits_i), soft_i) (see class_balanced_cross_entropy).
    Targets prepared on the CPU (labels come from NumPy) follow the logits to their device."""
    soft, item_weight = soft.to(logits.device), item_weight.to(logits.device)
    return (item_weight * -(soft * F.log_softmax(logits, dim=-1)).sum(-1)).mean()


def t_interval(values) -> tuple[float, float]:
    """The mean of `values` and the half-width of its 95% t-interval (nan for fewer than two values): the
    paired comparisons' and Table 1's error bars."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
