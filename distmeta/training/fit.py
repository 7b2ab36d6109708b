"""Supervised training with the class-balanced loss: SSL-E, Linear and Multi pretraining use `fit`; the
few-shot methods that fine-tune on a support batch (Entire-Few, Linear-Few, Multi-Few, Meta-PerSER's
`test_adapt: finetune`) use `fine_tune`.

`fit` is plain PyTorch; Ray Train workers call it with their rank and world
size (each worker takes every world_size-th batch) and a report callback.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights
from distmeta.report import Progress


@dataclass(kw_only=True)  # keyword-only: a config adding its own fields keeps those first for positional use
class TrainConfig:
    """What every supervised trainer (`fit`) is told; a model's own config adds to it (and a job may set other
    defaults, as `settings.py` does)."""
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def fit_settings(self) -> dict:
        """These settings as `fit`'s keyword arguments (a subclass's own settings stay out)."""
        return {name: getattr(self, name) for name in TrainConfig.__dataclass_fields__}


# Batches of similar length: rows are drawn in random pools of this many batches, each pool is sorted by
# length and cut into batches, and the batches are shuffled. A random batch pads every utterance to its
# longest one, and attention is quadratic in the padded length, so bucketing makes pretraining faster.
BUCKET_POOL = 8


def _batches(n: int, batch_size: int, rng: np.random.Generator | None, lengths=None):
    """Row indices per batch: shuffled with `rng` (None: in order), length-bucketed with `lengths`."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if lengths is None or np.ptp(lengths) == 0:  # rows of one length (pooled features): nothing to bucket
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    lengths, pool = np.asarray(lengths), batch_size * BUCKET_POOL
    if rng is None:  # evaluation: one pool, the mean loss does not depend on the order
        pool = n
    batches = []
    for start in range(0, n, pool):
        part = order[start:start + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def evaluate_loss(model, make_inputs, targets: np.ndarray, class_weights, batch_size: int = 32, lengths=None,
                  return_logits: bool = False):
    """The mean loss over `targets`' rows; with `return_logits`, (loss, logits [N, C] in row order)."""
    model.eval()
    total, rows, outputs = 0.0, [], []
    with torch.no_grad():
        for idx in _batches(len(targets), batch_size, None, lengths):
            logits = model(make_inputs(idx))
            loss = class_balanced_cross_entropy(logits, torch.as_tensor(targets[idx]), class_weights)
            total += loss.item() * len(idx)
            rows.append(torch.as_tensor(idx))
            outputs.append(logits.cpu())  # what val_score and the callers read, wherever the model runs
    model.train()
    if not return_logits:
        return total / len(targets)
    logits = torch.empty(len(targets), outputs[0].shape[-1], dtype=outputs[0].dtype)
    logits[torch.cat(rows)] = torch.cat(outputs)  # batches are length-sorted: back to row order
    return total / len(targets), logits


def fine_tune(model, inputs, targets: torch.Tensor, *, steps: int, lr: float, weight_decay: float = 0.0,
              on_step=None):
    """`steps` AdamW steps of `model`'s parameters with requires_grad on one batch (the class-balanced loss,
    weighted by the batch's own labels), in train mode, in place: few-shot adaptation on a support set.
    `on_step(step, model)`, when given, runs after each step (1-based), e.g. to score the queries along the
    way (benchmarks/bench_test_time.py); it may switch the model to eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    targets = targets.to(params[0].device) if params else targets  # inputs follow the model too (SERModel.pooled)
    weights = class_balanced_weights(targets)
    for step in range(1, steps + 1):
        model.train()
        loss = class_balanced_cross_entropy(model(inputs), targets, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, model)
    model.train()
    return model


def fit(model, make_inputs, targets: np.ndarray, val_targets: np.ndarray, make_val_inputs, *, epochs: int,
        batch_size: int, lr: float, weight_decay: float, seed: int, rank: int = 0, world_size: int = 1,
        patience: int = 0, on_epoch=None, log=functools.partial(print, flush=True), lengths=None,
        val_lengths=None, val_score=None, min_epochs: int = 0) -> dict:
    """Train the parameters with requires_grad; return the best state (lowest validation loss) and history.

    With `patience` > 0, training stops once that many epochs in a row did not improve the validation loss.
    `val_score(logits) -> float`, when given, replaces the validation loss as what picks the best epoch and
    what patience waits on (higher is better; the earliest best epoch wins ties): a loss can rise as the
    model grows confident while the metric it serves still improves. It is given the validation rows'
    logits [N, C] in row order, from the same pass that computes the validation loss.

    make_inputs(indices) -> model inputs for those rows of `targets`.
    `lengths` / `val_lengths`: each row's input length (a bank's `length`): batches then hold rows of
    similar length (`_batches`), which pads less.
    on_epoch(epoch, metrics, is_best, state_dict) is called after every epoch.
    `min_epochs`: epochs before it are never kept and never stop training (a warm-up before the validation
    set may judge: a small one is noisy enough to stop a still-improving model after its first epochs).
    """
    if min_epochs > epochs:
        raise ValueError(f"min_epochs ({min_epochs}) must not exceed epochs ({epochs})")
    class_weights = class_balanced_weights(targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    best = {"val_loss": math.inf, "score": -math.inf, "state": None, "epoch": -1}
    history = []
    progress = Progress("epoch", epochs, log)
    model.train()
    for epoch in range(epochs):
        every = _batches(len(targets), batch_size, rng, lengths)
        # equal batch counts on every worker, or DDP's all-reduce would wait forever
        batches = every[rank::world_size][: max(1, len(every) // world_size)]
        running = 0.0
        for idx in batches:
            logits = model(make_inputs(idx))
            loss = class_balanced_cross_entropy(logits, torch.as_tensor(targets[idx]), class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
        val_loss, val_logits = evaluate_loss(model, make_val_inputs, val_targets, class_weights, batch_size,
                                             val_lengths, return_logits=True)
        metrics = {"epoch": epoch + 1, "train_loss": running / max(len(batches), 1), "val_loss": val_loss}
        if val_score is not None:
            metrics["val_score"] = float(val_score(val_logits))
        history.append(metrics)
        score = metrics.get("val_score", -val_loss)
        judged = epoch + 1 >= min_epochs
        is_best = judged and score > best["score"]
        if is_best:
            best = {"val_loss": val_loss, "score": score, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        shown = f", val score {metrics['val_score']:.4f}" if val_score is not None else ""
        progress.update(epoch + 1, f"train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}{shown}"
                                   f"{' (best)' if is_best else ''}")
        if on_epoch:
            on_epoch(epoch + 1, metrics, is_best, model.state_dict())
        if patience and judged and epoch + 1 - best["epoch"] >= patience:
            break
    return {"best_state": best["state"], "best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "history": history}
