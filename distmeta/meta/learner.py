"""The meta-learning core both paths use: settings, one task's meta-gradient, the meta-learner and the outer loop.

    learner = MetaLearner(meta, config)            # a maml.MetaModel's trainable parameters and AdamW
    loss, grads = task_meta_gradient(learner.meta, bank, task, config, step, task_index, second_order)
    learner.outer_step([grads, ...])               # average over tasks, one AdamW step
    result = train(learner, SerialGradients(bank, tasks), len(tasks), bank, val_task)   # or an actors.ActorPool

A task is one person's labelled items (a `data.scenarios.Task`: an annotator's, or a speaker's) and a bank
maps its utterances to model inputs. `task_meta_gradient` is everything one task contributes to one outer
step; `SerialGradients` loops over tasks in process and is the reference the Ray task actors
(`distmeta.meta.actors`) are tested against.

Switches (the Meta-PerSER paper's Table 2): `ini` starts from a pretrained model (the path builds it);
`csmt` uses the same K items for the inner and outer loss (else K support + K query); `da` is first order
for the first `da_first_order_fraction` of the outer steps, then second order (without DA: second order
throughout); `lslr` trains the per-parameter per-step rates (else they stay at `inner_lr`).
Model selection (Meta-PerSER supplementary C): every `val_every` steps the validation task is meta-tested
with the rates (K support, adapt `val_steps`, scored on Q queries, averaged over `val_seeds`); the highest
macro-F1 on those queries wins (`select: maF1`), or the lowest class-balanced loss (`select: loss`). Both,
and micro-F1, are recorded (`val_loss`, `val_maF1`, `val_miF1`).
"""

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distmeta.features import PooledBank
from distmeta.meta.checkpoint import load_checkpoint, save_checkpoint
from distmeta.meta.maml import MetaModel
from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights, multilabel_scores
from distmeta.models.ser import trainable_parameters
from distmeta.report import Progress


@dataclass
class MetaConfig:
    scope: str = "head"  # head: the SSL-E upstream is frozen and its features cached; entire: everything adapts
    ini: bool = True
    csmt: bool = True
    da: bool = True
    da_first_order_fraction: float = 0.3
    lslr: bool = True
    # The paper's 1e-3 / 9e-5 are for the whole 94M-parameter model (`--preset paper`); the embedded
    # default adapts a small head on cached features, where those rates barely move it in 150 steps.
    inner_lr: float = 3e-3
    inner_steps: int = 5
    outer_lr: float = 3e-4
    outer_steps: int = 150
    shots: int = 32  # K, the paper's meta-training batch
    tasks_per_step: int = 0  # 0: every training annotator in every outer step
    multi_step_loss: bool = False  # MAML++ multi-step loss, uniform weights
    # Second-order steps keep only each inner step's parameters and rebuild that step's graph while
    # differentiating back (`maml.meta_gradients`): the same meta-gradients in the memory of one inner step's
    # graph instead of all of them, for one more forward and backward per step. For whole models on a GPU.
    recompute_inner: bool = False
    # Adaptation steps at meta-test and enrollment. 10 at 3e-4 (finetune) is what the validation annotators
    # pick within a budget of 10 steps (docs/results/listener.md); `--preset paper` takes 50.
    test_steps: int = 10
    # How meta-test and enrollment adapt to a person (validation always uses `rates`: it is cheap):
    # rates: the scope's parameters, `test_steps` SGD steps with the learned per-step rates (the MAML rule);
    # finetune: the whole model (conv encoder frozen) from the meta-trained state, `test_steps` AdamW steps at
    # `test_lr`: Entire-Few's procedure (protocol.adapt), so at equal settings the two differ only in where they
    # start (each takes its own validation pick within the same 10-step budget, docs/listener.md). With scope
    # head only the head was meta-trained and the rest is SSL-E's upstream, which fine-tuning moves too; the
    # head alone stays below Entire-Few on unseen annotators, however it adapts.
    test_adapt: str = "finetune"
    test_lr: float = 3e-4
    # finetune only: first this many steps of the scope's parameters with the learned rates (the MAML rule; with
    # scope head ~1 ms a step on pooled features), so that what LSLR learned is used at meta-test; 0: none. 10 is
    # the validation annotators' pick (docs/results/listener.md).
    test_rate_steps: int = 10
    val_steps: int = 50  # adaptation steps (with the learned rates) on the validation annotator's episodes
    val_every: int = 10
    val_shots: int = 0  # K of the validation annotator's support set; 0 = `shots` (set it when sweeping shots)
    val_seeds: int = 3
    val_queries: int = 64
    # Model selection on the validation episodes: maF1 (macro-F1) or loss (class-balanced). The loss bottoms out
    # early, as adapted predictions grow confident, while macro-F1 still rises.
    select: str = "maF1"
    seed: int = 0

    def __post_init__(self):
        if self.test_adapt not in ("rates", "finetune"):
            raise ValueError(f"meta.test_adapt must be rates or finetune, got {self.test_adapt!r}")
        if self.test_rate_steps < 0:
            raise ValueError(f"meta.test_rate_steps must be 0 or more, got {self.test_rate_steps}")


# torch's global random state, which seeded code below sets and draws from: trainings side by side in one
# process (jobs/meta_train.py's `parallel`) take turns, so each draws exactly what it would alone.
SEEDED = threading.RLock()


def task_seed(config: MetaConfig, step: int, task_index: int) -> int:
    return int(np.random.SeedSequence([config.seed, step, task_index]).generate_state(1)[0])


def sample_batches(task, config: MetaConfig, step: int, task_index: int):
    """Indices of the inner and outer items for one task in one outer step (None outer = CSMT)."""
    seed = task_seed(config, step, task_index)
    if config.csmt:
        return task.sample(config.shots, 0, seed=seed)[0], None
    return task.sample(config.shots, config.shots, seed=seed)


def step_weights(config: MetaConfig) -> list[float] | None:
    """MAML++'s multi-step loss weights (uniform), or None: the outer loss after the last inner step only."""
    return [1.0 / config.inner_steps] * config.inner_steps if config.multi_step_loss else None


def task_batch(bank, task, idx, device) -> tuple[dict, torch.Tensor]:
    """(inputs, targets) of the task's items at `idx`, on `device`."""
    inputs = {k: v.to(device) for k, v in bank.batch([task.utterances[i] for i in idx]).items()}
    return inputs, torch.as_tensor(task.targets[idx]).to(device)


def task_meta_gradient(meta: MetaModel, bank, task, config: MetaConfig, step: int, task_index: int,
                       second_order: bool) -> tuple[float, dict]:
    """One training annotator's contribution to one outer step: (outer loss, meta-gradients).

    Depends only on its arguments: the items come from (seed, step, task_index) and torch's
    random state (dropout) is seeded the same way, so any process computes the same result.
    """
    device = next(meta.parameters()).device
    inner_idx, outer_idx = sample_batches(task, config, step, task_index)
    inner = task_batch(bank, task, inner_idx, device)
    outer = None if outer_idx is None else task_batch(bank, task, outer_idx, device)
    with SEEDED, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(task_seed(config, step, task_index))
        loss, grads = meta.meta_gradients(inner, outer, steps=config.inner_steps, second_order=second_order,
                                          step_weights=step_weights(config), recompute=config.recompute_inner)
    return loss.item(), {n: g.cpu() for n, g in grads.items()}


def task_meta_gradients(meta: MetaModel, bank, tasks: list, config: MetaConfig, step: int,
                        second_order: bool) -> list[tuple[float, dict]]:
    """`task_meta_gradient` of each (task index, task) in `tasks`, in order. On pooled features (frozen-upstream
    scopes) they are computed together (`MetaModel.batched_meta_gradients`, the same numbers): the head has no
    dropout and every task's K items stack; on other inputs (scope entire: padded audio, dropout) one by one."""
    if not isinstance(bank, PooledBank) or len(tasks) < 2:
        return [task_meta_gradient(meta, bank, task, config, step, i, second_order) for i, task in tasks]
    device = next(meta.parameters()).device
    drawn = [(task, *sample_batches(task, config, step, i)) for i, task in tasks]
    inner = [task_batch(bank, task, inner_idx, device) for task, inner_idx, _ in drawn]
    outer = None if config.csmt else [task_batch(bank, task, outer_idx, device) for task, _, outer_idx in drawn]
    results = meta.batched_meta_gradients(inner, outer, steps=config.inner_steps, second_order=second_order,
                                          step_weights=step_weights(config))
    return [(loss.item(), {n: g.cpu() for n, g in grads.items()}) for loss, grads in results]


class MetaLearner:
    """The meta-model's trainable parameters (the model's, and its rates with LSLR) and the outer optimiser."""

    def __init__(self, meta: MetaModel, config: MetaConfig):
        self.meta, self.config = meta, config
        self.params = trainable_parameters(meta)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.outer_lr)

    def second_order(self, step: int) -> bool:
        if not self.config.da:
            return True
        return step >= int(self.config.da_first_order_fraction * self.config.outer_steps)

    def outer_step(self, task_grads: list[dict]) -> None:
        """Average the tasks' meta-gradients and take one AdamW step. Tasks hand their gradients back on the CPU
        (`task_meta_gradient`: they cross processes); they join the parameters wherever those are."""
        for name, param in self.params.items():
            param.grad = torch.stack([g[name] for g in task_grads]).mean(0).to(param.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trainable(self) -> dict:
        """What meta-training changes, by the meta-model's parameter names."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_trainable(self, state: dict) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state[name])

    def state(self, trainable: dict | None = None) -> dict:
        """The meta-model's state dict, with `trainable` (default: now) in place of its trainable parameters."""
        state = {k: v.detach().clone() for k, v in self.meta.state_dict().items()}
        state.update(trainable if trainable is not None else self.trainable())
        return state


def query_probs(meta: MetaModel, bank, query_ids, adapted: dict | None = None) -> torch.Tensor:
    """Class probabilities of `query_ids` with `adapted` parameters (a person's; None: the meta-trained ones),
    in eval mode (no dropout), the mode left as it was; on the CPU, wherever the model runs."""
    was_training = meta.training
    meta.eval()
    try:
        with torch.no_grad():
            return torch.softmax(meta(bank.batch(query_ids), adapted), -1).cpu()
    finally:
        meta.train(was_training)


def validation_metrics(meta: MetaModel, bank, task, config: MetaConfig) -> dict:
    """Supplementary C: meta-test the validation annotator, averaged over `val_seeds` episodes:
    class-balanced loss on its queries (the selection criterion) and their macro/micro-F1.
    A list of tasks (validation speakers): every one of them, averaged."""
    shots, scores = config.val_shots or config.shots, []
    episodes = [(t, s, *t.sample(shots, config.val_queries, seed=10_000 + s))
                for t in (task if isinstance(task, list) else [task]) for s in range(config.val_seeds)]
    supports = [(bank.batch([t.utterances[i] for i in support]), torch.as_tensor(t.targets[support]))
                for t, _, support, _ in episodes]
    if isinstance(bank, PooledBank):  # no dropout, stackable: every episode adapts at once (the same numbers)
        adapted = meta.batched_adapt(supports, config.val_steps)
    else:
        adapted = []
        for (_, seed, _, _), (inputs, targets) in zip(episodes, supports):
            with SEEDED, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                adapted.append(meta.adapt(inputs, targets, config.val_steps))
    for (task, seed, support, query), fast in zip(episodes, adapted):
        probs = query_probs(meta, bank, [task.utterances[i] for i in query], fast)
        q_targets = torch.as_tensor(task.targets[query])
        weights = class_balanced_weights(torch.as_tensor(task.targets[support]))
        loss = class_balanced_cross_entropy(torch.log(probs.clamp_min(1e-12)), q_targets, weights).item()
        f1 = multilabel_scores(probs, q_targets)
        scores.append({"val_loss": loss, "val_maF1": f1["maF1"], "val_miF1": f1["miF1"]})
    return {name: float(np.mean([s[name] for s in scores])) for name in scores[0]}


class SerialGradients:
    """Meta-gradients of the chosen tasks in this process (the reference)."""

    def __init__(self, bank, tasks: list):
        self.bank, self.tasks = bank, tasks

    def __call__(self, learner: MetaLearner, step: int, chosen, second_order: bool) -> list[tuple[float, dict]]:
        return task_meta_gradients(learner.meta, self.bank, [(i, self.tasks[i]) for i in chosen], learner.config, step,
                                   second_order)


def chosen_tasks(rng: np.random.Generator, n_tasks: int, config: MetaConfig) -> list[int]:
    if config.tasks_per_step and config.tasks_per_step < n_tasks:
        return sorted(int(i) for i in rng.choice(n_tasks, config.tasks_per_step, replace=False))
    return list(range(n_tasks))


SELECTION = {"loss": ("val_loss", "min"), "maF1": ("val_maF1", "max")}  # meta.select: record key, better way


def selection(select: str) -> tuple[str, str]:
    """What picks the kept meta-parameters among the validations (ties keep the earlier step), and what
    sweeps rank trials by (jobs/tune.py): (validation record key, "min" or "max")."""
    if select not in SELECTION:
        raise ValueError(f"meta.select must be one of {list(SELECTION)}, got {select!r}")
    return SELECTION[select]


def train(learner: MetaLearner, gradients, n_tasks: int, bank, val_task, *, checkpoint=None, checkpoint_every: int = 0,
          resume: bool = False, settings: dict | None = None, log=print, on_step=None) -> dict:
    """The outer loop every meta-trainer shares; `gradients(learner, step, chosen, second_order)` supplies
    [(outer loss, meta-gradients)] for the chosen tasks (SerialGradients, or Ray actors). `val_task`: the
    validation task, or a list of them (see validation_metrics).

    With `checkpoint` (a file path) the state is saved atomically every `checkpoint_every` steps and
    at the end; with `resume`, an existing checkpoint is continued from, and the result equals an
    uninterrupted run's. `settings` (default: the meta settings) is everything that shaped the run, saved
    in the checkpoint; resuming with any of it changed is refused.
    """
    config = learner.config
    selected, direction = selection(config.select)
    settings = json.loads(json.dumps(settings if settings is not None else {"meta": asdict(config)}))
    rng = np.random.default_rng(config.seed)
    best = {"val_loss": float("inf"), "score": -float("inf"), "state": learner.trainable(), "step": 0}
    history, start = [], 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        start, best, history = load_checkpoint(checkpoint, learner, rng, settings)
        if log:
            log(f"resuming meta-training from {checkpoint} after step {start}")
    progress, last_val = Progress("meta step", config.outer_steps, log, start=start), None
    for step in range(start, config.outer_steps):
        second = learner.second_order(step)
        results = gradients(learner, step, chosen_tasks(rng, n_tasks, config), second)
        learner.outer_step([g for _, g in results])
        record = {"step": step + 1, "outer_loss": float(np.mean([loss for loss, _ in results])), "second_order": second}
        if (step + 1) % config.val_every == 0 or step + 1 == config.outer_steps:
            record.update(validation_metrics(learner.meta, bank, val_task, config))
            last_val = record
            score = record[selected] if direction == "max" else -record[selected]
            if score > best["score"]:
                best = {"val_loss": record["val_loss"], "score": score, "state": learner.trainable(), "step": step + 1}
        history.append(record)
        if checkpoint is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == config.outer_steps):
            save_checkpoint(checkpoint, learner, step + 1, rng, best, history, settings)
        val = "" if last_val is None else (f", val loss {last_val['val_loss']:.4f} / maF1 {last_val['val_maF1']:.3f} "
                                           f"(best {config.select} at {best['step']})")
        progress.update(step + 1, f"outer loss {record['outer_loss']:.4f}{val}, {'2nd' if second else '1st'} order")
        if on_step:
            on_step(record)
    return {"best_state": learner.state(best["state"]), "best_step": best["step"], "best_val_loss": best["val_loss"],
            "history": history, "config": asdict(config)}


def train_serial(learner: MetaLearner, bank, tasks: list, val_task, log=print, on_step=None, **checkpointing) -> dict:
    """The reference meta-trainer: every outer step, each (sampled) training task in turn, in process."""
    return train(learner, SerialGradients(bank, tasks), len(tasks), bank, val_task, log=log, on_step=on_step, **checkpointing)
