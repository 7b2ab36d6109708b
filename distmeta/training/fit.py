"""Supervised training with the class-balanced loss: SSL-E, Linear and Multi pretraining use it.

`fit` is plain PyTorch; Ray Train workers call it with their rank and world
size (each worker takes every world_size-th batch) and a report callback.
"""

import functools
import math
import time

import numpy as np
import torch

from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def evaluate_loss(model, make_inputs, targets: np.ndarray, class_weights, batch_size: int = 32) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for idx in _batches(len(targets), batch_size, None):
            logits = model(make_inputs(idx))
            loss = class_balanced_cross_entropy(logits, torch.as_tensor(targets[idx]), class_weights)
            total += loss.item() * len(idx)
    model.train()
    return total / len(targets)


def fit(model, make_inputs, targets: np.ndarray, val_targets: np.ndarray, make_val_inputs, *, epochs: int,
        batch_size: int, lr: float, weight_decay: float, seed: int, rank: int = 0, world_size: int = 1,
        patience: int = 0, on_epoch=None, log=functools.partial(print, flush=True)) -> dict:
    """Train the parameters with requires_grad; return the best state (lowest validation loss) and history.

    With `patience` > 0, training stops once that many epochs in a row did not improve the validation loss.

    make_inputs(indices) -> model inputs for those rows of `targets`.
    on_epoch(epoch, metrics, is_best, state_dict) is called after every epoch.
    """
    class_weights = class_balanced_weights(targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    best = {"val_loss": math.inf, "state": None, "epoch": -1}
    history = []
    started = time.time()
    model.train()
    for epoch in range(epochs):
        every = _batches(len(targets), batch_size, rng)
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
        val_loss = evaluate_loss(model, make_val_inputs, val_targets, class_weights, batch_size)
        metrics = {"epoch": epoch + 1, "train_loss": running / max(len(batches), 1), "val_loss": val_loss}
        history.append(metrics)
        is_best = val_loss < best["val_loss"]
        if is_best:
            best = {"val_loss": val_loss, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        elapsed = time.time() - started
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}, val loss {val_loss:.4f}"
                f"{' (best)' if is_best else ''}, {elapsed:.0f}s elapsed, ETA {elapsed / (epoch + 1) * (epochs - epoch - 1):.0f}s")
        if on_epoch:
            on_epoch(epoch + 1, metrics, is_best, model.state_dict())
        if patience and epoch + 1 - best["epoch"] >= patience:
            break
    return {"best_state": best["state"], "best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "history": history}
