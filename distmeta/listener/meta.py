"""MAML meta-gradients, the one entry point every meta-trainer calls (serial or on Ray).

    outer_loss, grads = meta_gradients(model, loss_fn, inner_batch, outer_batch=None,
                                       lrs=lrs, steps=5, second_order=True)

- `model(inputs) -> logits`; a batch is `(inputs, targets)`; `loss_fn(logits, targets) -> scalar`.
- `outer_batch=None` is Combined-Set Meta-Training: the outer loss uses the inner batch.
- `lrs[name]` is a 1-D tensor of per-step learning rates for each trainable parameter
  (LSLR, MAML++); step i updates p <- p - lrs[name][i] * grad. Steps past the end
  of a vector reuse its last rate.
- `second_order=False` treats the inner gradients as constants (first-order MAML);
  True differentiates through the inner loop.
- `grads[name]` is the meta-gradient of each trainable parameter and
  `grads["lr/" + name]` the gradient w.r.t. its learning-rate vector.
- Parameters with requires_grad=False stay fixed (that is how adaptation scopes work).
- `step_weights` (optional, MAML++'s multi-step loss) makes the outer loss the
  weighted sum of the outer losses after each inner step.
"""

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def _rate(lr: torch.Tensor, step: int) -> torch.Tensor:
    return lr[min(step, len(lr) - 1)]


def adapt(model, loss_fn, batch, *, lrs, steps, second_order=False, params=None):
    """Run `steps` inner SGD steps from `params` (default: the model's trainable parameters).

    Returns the list of parameter dicts after each step (index 0 is the start).
    """
    params = params if params is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    inputs, targets = batch
    trajectory = [params]
    for step in range(steps):
        current = trajectory[-1]
        loss = loss_fn(functional_call(model, current, (inputs,)), targets)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=second_order, allow_unused=True)
        trajectory.append({name: w if g is None else w - _rate(lrs[name], step) * g
                           for (name, w), g in zip(current.items(), grads)})
    return trajectory


def meta_gradients(model, loss_fn, inner_batch, outer_batch=None, *, lrs, steps, second_order, step_weights=None):
    if second_order:
        # Fused attention kernels (flash, memory-efficient) have no double backward; the math one does.
        with sdpa_kernel([SDPBackend.MATH]):
            return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, True, step_weights)
    return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, False, step_weights)


def _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, second_order, step_weights):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(lrs))
    if missing:
        raise KeyError(f"no learning rates for trainable parameter(s) {missing}")
    # Local leaves, so the LSLR gradient exists whether or not the caller trains the rates.
    rates = {name: lrs[name].detach().clone().requires_grad_(True) for name in params}
    trajectory = adapt(model, loss_fn, inner_batch, lrs=rates, steps=steps, second_order=second_order)
    outer_inputs, outer_targets = outer_batch if outer_batch is not None else inner_batch
    if step_weights is None:
        outer_loss = loss_fn(functional_call(model, trajectory[-1], (outer_inputs,)), outer_targets)
    else:
        if len(step_weights) != steps:
            raise ValueError(f"step_weights has {len(step_weights)} entries for {steps} steps")
        outer_loss = sum(w * loss_fn(functional_call(model, p, (outer_inputs,)), outer_targets)
                         for w, p in zip(step_weights, trajectory[1:]))
    leaves = list(params.values()) + list(rates.values())
    grads = torch.autograd.grad(outer_loss, leaves, allow_unused=True)
    names = list(params) + [f"lr/{n}" for n in rates]
    out = {name: torch.zeros_like(leaf) if g is None else g for name, leaf, g in zip(names, leaves, grads)}
    return outer_loss.detach(), out
