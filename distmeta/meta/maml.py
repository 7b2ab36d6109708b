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
- `recompute=True` (second order) keeps only the parameters after each inner step, not the steps' graphs,
  and differentiates back one step at a time, rebuilding that step's graph: the same meta-gradients, with
  the memory of one inner step's graph instead of all of them, for one more forward and backward a step.
- `batched_meta_gradients` is the same for several tasks at once (torch.func.vmap over the tasks):
  what a small model on cached features needs, where a loop over tasks costs more than the arithmetic.

A MetaModel saves and loads as an ordinary state dict. The functional core below (`adapt`,
`meta_gradients` on a model and a {parameter name: rates} dict) is what it calls; the tests check
it against finite differences.
"""

import threading
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from distmeta.metrics import balanced_targets, class_balanced_weights, weighted_cross_entropy
from distmeta.models.ser import trainable_parameters


class BatchBalancedLoss:
    """Class-balanced loss with class weights from the batch itself (its N items are the training items).

    What depends on the targets alone (soft targets, item weights; most of the loss's ops) is computed once
    per batch by `prepare`, which the core calls before its loops: an inner step on pooled features then runs
    only the ops that depend on the logits. Called with raw targets it prepares them itself.
    """

    def prepare(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = targets.detach()
        return balanced_targets(targets, class_balanced_weights(targets).to(targets.device))

    def __call__(self, logits, targets):
        return weighted_cross_entropy(logits, *(self.prepare(targets) if torch.is_tensor(targets) else targets))


batch_balanced_loss = BatchBalancedLoss()


def _prepared(loss_fn, targets):
    """`targets` as `loss_fn` takes them in its inner loops (prepared once when it can, see BatchBalancedLoss)."""
    prepare = getattr(loss_fn, "prepare", None)
    return targets if prepare is None else prepare(targets)


def _rate(lr: torch.Tensor, step: int) -> torch.Tensor:
    return lr[min(step, len(lr) - 1)]


# `sdpa_kernel` sets process-wide flags, so a thread beside this one (trainings side by side in one process,
# jobs/meta_train.py's `parallel`) would run its attention with them, or lose them mid-way when another
# thread's section ends. Sections that need them take turns; pooled features (the head alone) run no
# attention and leave them alone.
_MATH_ATTENTION = threading.RLock()


@contextmanager
def _double_backward_attention(inputs):
    """The math attention kernel while a second-order pass over `inputs` runs: the fused kernels (flash,
    memory-efficient) have no double backward."""
    if isinstance(inputs, dict) and set(inputs) == {"pooled"}:
        yield
        return
    with _MATH_ATTENTION, sdpa_kernel([SDPBackend.MATH]):
        yield


def _call(model, params: dict, inputs):
    """`model(inputs)` with `params` in place of its parameters of those names. tie_weights=False: torch's
    default walks every parameter of the model (the whole upstream) on every call to find tied ones, which
    is most of an inner step on pooled features; `_check_untied` makes sure there are none."""
    return functional_call(model, params, (inputs,), tie_weights=False)


def _check_untied(model) -> None:
    if len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters())):
        raise ValueError("the model shares a parameter between two names (tied weights): not supported here")


def _on(targets, device):
    """Targets (a tensor or a tuple of them) on the parameters' device; inputs follow the model by themselves."""
    if isinstance(targets, tuple):
        return tuple(_on(t, device) for t in targets)
    return targets.to(device) if isinstance(targets, torch.Tensor) else targets


def adapt(model, loss_fn, batch, *, lrs, steps, second_order=False, params=None, keep_trajectory=True):
    """Run `steps` inner SGD steps from `params` (default: the model's trainable parameters) with
    `lrs[name]` the per-step rates of each. Returns the parameter dicts after each step (0: the start);
    without `keep_trajectory`, the last one alone ([final]): a whole model's 50 meta-test steps would
    otherwise hold 50 copies of it (WavLM Base: 18 of the 21.6 GiB one listener's meta-test took)."""
    _check_untied(model)
    params = params if params is not None else trainable_parameters(model)
    inputs, targets = batch[0], _prepared(loss_fn, _on(batch[1], next(iter(params.values())).device))
    trajectory = [params]
    for step in range(steps):
        current = trajectory[-1]
        loss = loss_fn(_call(model, current, inputs), targets)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=second_order, allow_unused=True)
        trajectory.append({name: w if g is None else w - _rate(lrs[name], step) * g
                           for (name, w), g in zip(current.items(), grads)})
        if not keep_trajectory:
            del trajectory[:-1]
    return trajectory


def meta_gradients(model, loss_fn, inner_batch, outer_batch=None, *, lrs, steps, second_order, step_weights=None,
                   recompute=False):
    """(outer loss, {name: meta-gradient of each trainable parameter}, {name: gradient of its rates})."""
    if second_order:
        with _double_backward_attention(inner_batch[0]):
            if recompute:
                return _recomputed_meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, step_weights)
            return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, True, step_weights)
    return _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, False, step_weights)


def _leaves(model, lrs) -> tuple[dict, dict]:
    """The trainable parameters, and their rates as local leaves (so the LSLR gradient exists whether or not
    the caller trains the rates)."""
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(lrs))
    if missing:
        raise KeyError(f"no learning rates for trainable parameter(s) {missing}")
    return params, {name: lrs[name].detach().clone().requires_grad_(True) for name in params}


def _meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, second_order, step_weights):
    params, rates = _leaves(model, lrs)
    trajectory = adapt(model, loss_fn, inner_batch, lrs=rates, steps=steps, second_order=second_order)
    outer_inputs, outer_targets = outer_batch if outer_batch is not None else inner_batch
    outer_targets = _prepared(loss_fn, outer_targets)
    if step_weights is None:
        outer_loss = loss_fn(_call(model, trajectory[-1], outer_inputs), outer_targets)
    else:
        if len(step_weights) != steps:
            raise ValueError(f"step_weights has {len(step_weights)} entries for {steps} steps")
        outer_loss = sum(w * loss_fn(_call(model, p, outer_inputs), outer_targets)
                         for w, p in zip(step_weights, trajectory[1:]))
    leaves = list(params.values()) + list(rates.values())
    grads = [torch.zeros_like(leaf) if g is None else g
             for leaf, g in zip(leaves, torch.autograd.grad(outer_loss, leaves, allow_unused=True))]
    return outer_loss.detach(), dict(zip(params, grads[:len(params)])), dict(zip(rates, grads[len(params):]))


def _recomputed_meta_gradients(model, loss_fn, inner_batch, outer_batch, lrs, steps, step_weights):
    """Second-order meta-gradients by reverse accumulation over the inner steps: v = d(outer loss)/d(theta_i)
    is carried from the last step back to the first, each step's graph rebuilt from its saved parameters
    (and the random state its forward drew dropout from) and dropped once v has passed through it (a
    vector-Jacobian product). Only the parameters after each step stay in memory."""
    params, rates = _leaves(model, lrs)
    names, inputs = list(params), inner_batch[0]
    device = next(iter(params.values())).device
    inner_targets = _prepared(loss_fn, _on(inner_batch[1], device))
    outer_inputs, outer_targets = outer_batch if outer_batch is not None else inner_batch
    outer_targets = _prepared(loss_fn, outer_targets)
    weights = [0.0] * (steps - 1) + [1.0] if step_weights is None else list(step_weights)
    if len(weights) != steps:
        raise ValueError(f"step_weights has {len(step_weights)} entries for {steps} steps")

    def grads_at(point: dict, inputs, targets, create_graph=False):
        loss = loss_fn(_call(model, point, inputs), targets)
        return loss, torch.autograd.grad(loss, list(point.values()), create_graph=create_graph, allow_unused=True)

    # forward, in the order the one-graph computation draws its random numbers: the inner steps, then the
    # outer loss at each weighted step; kept: each step's parameters and random state, the outer gradients
    trajectory, states = [{name: p.detach() for name, p in params.items()}], []
    for step in range(steps):
        states.append(_rng_state(device))
        point = {name: p.clone().requires_grad_(True) for name, p in trajectory[-1].items()}
        _, grads = grads_at(point, inputs, inner_targets)
        trajectory.append({name: (w if g is None else w - _rate(rates[name], step).detach() * g).detach()
                           for (name, w), g in zip(point.items(), grads)})
    outer_loss, outer_grads = torch.zeros((), device=device), {}
    for step, weight in enumerate(weights, 1):
        if weight:
            loss, grads = grads_at({name: p.clone().requires_grad_(True) for name, p in trajectory[step].items()},
                                   outer_inputs, outer_targets)
            outer_loss, outer_grads[step] = outer_loss + weight * loss.detach(), [None if g is None else weight * g for g in grads]
    after_forward = _rng_state(device)
    v = [torch.zeros_like(p) for p in trajectory[0].values()]
    rate_grads = [torch.zeros_like(r) for r in rates.values()]
    for step in range(steps, 0, -1):
        v = [a if g is None else a + g for a, g in zip(v, outer_grads.get(step, [None] * len(v)))]
        # step-1 -> step rebuilt, theta' = theta - rate * grad L(theta); then v <- v^T d(theta') / d(theta, rates)
        _set_rng_state(states[step - 1], device)
        point = {name: p.clone().requires_grad_(True) for name, p in trajectory[step - 1].items()}
        _, grads = grads_at(point, inputs, inner_targets, create_graph=True)
        after = [w if g is None else w - _rate(rates[name], step - 1) * g for (name, w), g in zip(point.items(), grads)]
        back = torch.autograd.grad(after, list(point.values()) + list(rates.values()), grad_outputs=v, allow_unused=True)
        v = [torch.zeros_like(a) if g is None else g for a, g in zip(v, back[:len(names)])]
        rate_grads = [a if g is None else a + g for a, g in zip(rate_grads, back[len(names):])]
    _set_rng_state(after_forward, device)
    return outer_loss, dict(zip(names, v)), dict(zip(names, rate_grads))


def _rng_state(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def batched_meta_gradients(model, loss_fn, inner_batches: list, outer_batches: list | None = None, *, lrs, steps,
                           second_order, step_weights=None) -> list:
    """`meta_gradients` of several tasks at once: [(outer loss, params' meta-gradients, rates' gradients)] per task.

    One vectorised computation instead of a loop: each task gets its own copy of the parameters and rates
    (stacked along a first dimension), the forward runs for all tasks at once (torch.func.vmap), and ordinary
    autograd differentiates the sum of the tasks' losses, which gives each copy its own task's gradient.
    Every op runs once for all tasks, which is what makes a small model's meta-gradient cheap (a loop spends
    its time in per-op overhead, not arithmetic; vmapping the gradients as well cost ~1.5x this). The tasks'
    inputs must stack: the same keys and shapes (pooled features, K items each), and the model must be
    deterministic (no dropout: the loop seeds each task apart).
    """
    params = {name: p.detach() for name, p in trainable_parameters(model).items()}
    missing = sorted(set(params) - set(lrs))
    if missing:
        raise KeyError(f"no learning rates for trainable parameter(s) {missing}")
    if step_weights is not None and len(step_weights) != steps:
        raise ValueError(f"step_weights has {len(step_weights)} entries for {steps} steps")
    tasks = len(inner_batches)
    start = {name: _per_task(p, tasks).requires_grad_(True) for name, p in params.items()}
    rates = {name: _per_task(lrs[name].detach(), tasks).requires_grad_(True) for name in params}
    losses_of = _task_losses(model, loss_fn)
    device = next(iter(params.values())).device
    outer_inputs, outer_targets = _stacked(outer_batches if outer_batches is not None else inner_batches, loss_fn, device)
    with _double_backward_attention(inner_batches[0][0]):  # as in meta_gradients
        trajectory = _stacked_adapt(losses_of, start, rates, *_stacked(inner_batches, loss_fn, device), steps, second_order)
        if step_weights is None:
            losses = losses_of(trajectory[-1], outer_inputs, outer_targets)
        else:
            losses = sum(w * losses_of(q, outer_inputs, outer_targets) for w, q in zip(step_weights, trajectory[1:]))
        leaves = list(start.values()) + list(rates.values())
        grads = [torch.zeros_like(leaf) if g is None else g
                 for leaf, g in zip(leaves, torch.autograd.grad(losses.sum(), leaves, allow_unused=True))]
    param_grads, rate_grads = dict(zip(start, grads[:len(start)])), dict(zip(rates, grads[len(start):]))
    return [(losses[t].detach(), {n: g[t] for n, g in param_grads.items()}, {n: g[t] for n, g in rate_grads.items()})
            for t in range(tasks)]


def batched_adapt(model, loss_fn, batches: list, *, lrs, steps) -> list[dict]:
    """`adapt` (first order) on several batches at once (see batched_meta_gradients): the final
    parameters of each, detached."""
    tasks = len(batches)
    params = {name: _per_task(p.detach(), tasks) for name, p in trainable_parameters(model).items()}
    rates = {name: _per_task(lrs[name].detach(), tasks) for name in params}
    losses_of = _task_losses(model, loss_fn)
    inputs, targets = _stacked(batches, loss_fn, next(iter(params.values())).device)
    for step in range(steps):  # first order: each step starts from the last one's values, no graph across steps
        params = {name: p.requires_grad_(True) for name, p in params.items()}
        grads = torch.autograd.grad(losses_of(params, inputs, targets).sum(), list(params.values()))
        params = {name: (w - _task_rate(rates[name], step, w) * g).detach() for (name, w), g in zip(params.items(), grads)}
    return [{name: p[i] for name, p in params.items()} for i in range(tasks)]


def _functional_loss(model, loss_fn):
    _check_untied(model)
    return lambda params, inputs, targets: loss_fn(_call(model, params, inputs), targets)


def _task_losses(model, loss_fn):
    """(params, inputs, targets), each stacked over tasks -> the tasks' losses [T]: the forward of every task at once."""
    from torch.func import vmap

    return vmap(_functional_loss(model, loss_fn))


def _per_task(tensor: torch.Tensor, tasks: int) -> torch.Tensor:
    """`tasks` copies of `tensor` along a new first dimension."""
    return tensor.unsqueeze(0).repeat(tasks, *[1] * tensor.dim()).contiguous()


def _stacked_adapt(losses_of, params, rates, inputs, targets, steps, second_order) -> list[dict]:
    """`adapt`'s inner loop for stacked tasks: params {name: [T, ...]}, rates {name: [T, steps]}. The sum of
    the tasks' losses differentiates into each task's own gradient, since a task's copy reaches only its loss."""
    trajectory = [params]
    for step in range(steps):
        current = trajectory[-1]
        grads = torch.autograd.grad(losses_of(current, inputs, targets).sum(), list(current.values()),
                                    create_graph=second_order)
        trajectory.append({name: w - _task_rate(rates[name], step, w) * g for (name, w), g in zip(current.items(), grads)})
    return trajectory


def _task_rate(rates: torch.Tensor, step: int, like: torch.Tensor) -> torch.Tensor:
    """Each task's rate at `step` (`_rate` of each row of [T, steps]), shaped [T, 1, ...] to scale `like` [T, ...]."""
    return _rate(rates.T, step).reshape(-1, *[1] * (like.dim() - 1))


def _stacked(batches: list, loss_fn, device: torch.device) -> tuple:
    """[(inputs, targets)] -> (inputs, targets) with a leading dimension over the batches, on `device` (the
    parameters'; moved before vmap, which then sees one device); inputs: a tensor or a dict of them; targets:
    as `loss_fn` takes them (prepared per batch, see BatchBalancedLoss)."""
    first = batches[0][0]
    inputs = ({key: torch.stack([b[0][key] for b in batches]).to(device) for key in first} if isinstance(first, dict)
              else torch.stack([b[0] for b in batches]).to(device))
    targets = [_prepared(loss_fn, b[1]) for b in batches]
    if isinstance(targets[0], tuple):
        return inputs, tuple(torch.stack(part).to(device) for part in zip(*targets))
    return inputs, torch.stack(targets).to(device)


def _rate_key(name: str) -> str:
    return name.replace(".", "/")  # module attribute names hold no dots


class MetaModel(nn.Module):
    """A model and the per-step inner rates of each of its trainable parameters, as one module."""

    def __init__(self, model: nn.Module, inner_steps: int, inner_lr: float, loss_fn=batch_balanced_loss):
        super().__init__()
        _check_untied(model)
        self.model, self.loss_fn = model, loss_fn
        self.rates = nn.ParameterDict({_rate_key(name): nn.Parameter(torch.full((inner_steps,), float(inner_lr)))
                                       for name in trainable_parameters(model)})

    def forward(self, inputs, params: dict | None = None):
        """The model's output, with `params` (e.g. adapted ones) in place of its trainable parameters."""
        return self.model(inputs) if params is None else _call(self.model, params, inputs)

    def learning_rates(self) -> dict:
        """{model parameter name: its per-step rates}."""
        return {name: self.rates[_rate_key(name)] for name in trainable_parameters(self.model)}

    def adapt(self, inputs, targets, steps: int) -> dict:
        """The model's trainable parameters after `steps` inner steps on (inputs, targets), detached."""
        rates = {name: r.detach() for name, r in self.learning_rates().items()}
        trajectory = adapt(self.model, self.loss_fn, (inputs, targets), lrs=rates, steps=steps, keep_trajectory=False)
        return {name: p.detach() for name, p in trajectory[-1].items()}

    def batched_adapt(self, batches: list, steps: int) -> list[dict]:
        """`adapt` on each (inputs, targets) in `batches`, computed together (see the function)."""
        rates = {name: r.detach() for name, r in self.learning_rates().items()}
        return batched_adapt(self.model, self.loss_fn, batches, lrs=rates, steps=steps)

    def meta_gradients(self, inner_batch, outer_batch=None, *, steps: int, second_order: bool, step_weights=None,
                       recompute=False):
        """(outer loss, {name in self.named_parameters(): meta-gradient}) for the parameters that require grad."""
        loss, params, rates = meta_gradients(self.model, self.loss_fn, inner_batch, outer_batch, lrs=self.learning_rates(),
                                             steps=steps, second_order=second_order, step_weights=step_weights,
                                             recompute=recompute)
        return loss, self._named(params, rates)

    def batched_meta_gradients(self, inner_batches: list, outer_batches: list | None = None, *, steps: int,
                               second_order: bool, step_weights=None) -> list:
        """`meta_gradients` of several tasks in one vectorised computation (see the function): [(loss, grads)]."""
        results = batched_meta_gradients(self.model, self.loss_fn, inner_batches, outer_batches, lrs=self.learning_rates(),
                                         steps=steps, second_order=second_order, step_weights=step_weights)
        names = list(trainable_parameters(self))  # once, not per task: it walks the whole model
        return [(loss, self._named(params, rates, names)) for loss, params, rates in results]

    def _named(self, params: dict, rates: dict, names: list | None = None) -> dict:
        """Gradients keyed like `self.named_parameters()`, for the parameters that require grad (`names`)."""
        grads = {f"model.{name}": g for name, g in params.items()}
        grads.update({f"rates.{_rate_key(name)}": g for name, g in rates.items()})
        return {name: grads[name] for name in (names if names is not None else trainable_parameters(self))}

    def clone(self) -> "MetaModel":
        """An independent copy (the model's own `clone`, see SERModel.clone)."""
        twin = MetaModel(self.model.clone(), len(next(iter(self.rates.values()))), 0.0, self.loss_fn)
        twin.load_state_dict(self.state_dict())
        twin.rates.requires_grad_(next(iter(self.rates.values())).requires_grad)
        return twin
