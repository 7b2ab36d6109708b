"""MAML with per-layer per-step learning rates (LSLR, MAML++): the meta-model and its meta-gradients.

    meta = MetaModel(model, inner_steps=5, inner_lr=3e-3)     # the model + one rate vector per trainable parameter
    fast = meta.adapt(inputs, targets, steps=5)               # adapted parameters (the model itself is untouched)
    probs = meta(query_inputs, fast).softmax(-1)
    loss, grads = meta.meta_gradients(inner_batch, outer_batch=None, steps=5, second_order=True)

- `model(inputs) -> logits`; a batch is `(inputs, targets)`; the loss is `loss_fn(logits, targets)`
  (default: class-balanced cross-entropy with class weights from the batch itself).
- Inner step i updates each trainable parameter p <- p - rate[i] * grad; steps past the end of the
  rate vector reuse its last rate. Parameters with requires_grad=False stay fixed (adaptation scopes).
- `outer_batch=None` is Combined-Set Meta-Training: the outer loss uses the inner batch.
- `second_order=False` treats the inner gradients as constants (first-order MAML).
- `grads` is keyed like `meta.named_parameters()` (`model.<name>`, `rates.<name>`): one entry for
  every parameter that requires grad. Freezing the rates (`meta.rates.requires_grad_(False)`) is
  training without LSLR.
- `step_weights` (MAML++'s multi-step loss) makes the outer loss the weighted sum of the outer
  losses after each inner step.

A MetaModel saves and loads as an ordinary state dict. The functional core below (`adapt`,
`meta_gradients` on a model and a {parameter name: rates} dict) is what it calls; the tests check
it against finite differences.
"""

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights
from distmeta.models.ser import trainable_parameters


def batch_balanced_loss(logits, targets):
    """Class-balanced loss with class weights from the batch itself (its N items are the training items)."""
    return class_balanced_cross_entropy(logits, targets, class_balanced_weights(targets.detach()).to(targets.device))


def _rate(lr: torch.Tensor, step: int) -> torch.Tensor:
    return lr[min(step, len(lr) - 1)]


def adapt(model, loss_fn, batch, *, lrs, steps, second_order=False, params=None):
    """Run `steps` inner SGD steps from `params` (default: the model's trainable parameters) with
    `lrs[name]` the per-step rates of each. Returns the parameter dicts after each step (0: the start)."""
    params = params if params is not None else trainable_parameters(model)
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
    """(outer loss, {name: meta-gradient of each trainable parameter}, {name: gradient of its rates})."""
    if second_order:
        # Fused attention kernels (flash, memory-efficient) have no double backward; the math one does.
        with sdpa_kernel([SDPBackend.MATH]):
            return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, True, step_weights)
    return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, False, step_weights)


def _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, second_order, step_weights):
    params = trainable_parameters(model)
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
    grads = [torch.zeros_like(leaf) if g is None else g
             for leaf, g in zip(leaves, torch.autograd.grad(outer_loss, leaves, allow_unused=True))]
    return outer_loss.detach(), dict(zip(params, grads[:len(params)])), dict(zip(rates, grads[len(params):]))


def _rate_key(name: str) -> str:
    return name.replace(".", "/")  # module attribute names hold no dots


class MetaModel(nn.Module):
    """A model and the per-step inner rates of each of its trainable parameters, as one module."""

    def __init__(self, model: nn.Module, inner_steps: int, inner_lr: float, loss_fn=batch_balanced_loss):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.rates = nn.ParameterDict({_rate_key(name): nn.Parameter(torch.full((inner_steps,), float(inner_lr)))
                                       for name in trainable_parameters(model)})

    def forward(self, inputs, params: dict | None = None):
        """The model's output, with `params` (e.g. adapted ones) in place of its trainable parameters."""
        return self.model(inputs) if params is None else functional_call(self.model, params, (inputs,))

    def learning_rates(self) -> dict:
        """{model parameter name: its per-step rates}."""
        return {name: self.rates[_rate_key(name)] for name in trainable_parameters(self.model)}

    def adapt(self, inputs, targets, steps: int) -> dict:
        """The model's trainable parameters after `steps` inner steps on (inputs, targets), detached."""
        rates = {name: r.detach() for name, r in self.learning_rates().items()}
        trajectory = adapt(self.model, self.loss_fn, (inputs, targets), lrs=rates, steps=steps)
        return {name: p.detach() for name, p in trajectory[-1].items()}

    def meta_gradients(self, inner_batch, outer_batch=None, *, steps: int, second_order: bool, step_weights=None):
        """(outer loss, {name in self.named_parameters(): meta-gradient}) for the parameters that require grad."""
        loss, params, rates = meta_gradients(self.model, self.loss_fn, inner_batch, outer_batch, lrs=self.learning_rates(),
                                             steps=steps, second_order=second_order, step_weights=step_weights)
        grads = {f"model.{name}": g for name, g in params.items()}
        grads.update({f"rates.{_rate_key(name)}": g for name, g in rates.items()})
        return loss, {name: grads[name] for name in trainable_parameters(self)}

    def clone(self) -> "MetaModel":
        """An independent copy (the model's own `clone`, see SERModel.clone)."""
        twin = MetaModel(self.model.clone(), len(next(iter(self.rates.values()))), 0.0, self.loss_fn)
        twin.load_state_dict(self.state_dict())
        twin.rates.requires_grad_(next(iter(self.rates.values())).requires_grad)
        return twin
