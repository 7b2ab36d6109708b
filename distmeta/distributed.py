"""Distributed meta-training on Ray: one actor per training annotator, the driver aggregates.

    actors = ActorPool(ActorConfig(num_gpus=0.25))
    result = meta_train_split(corpus, split, upstream, ssl_e, meta, actors=actors)   # metatrain.py

`ActorPool.setup` gives each training annotator's task to one `TaskActor`: its
items, their inputs (cached pooled features for frozen-upstream scopes, audio for
`entire`) and a model replica. The driver is `metatrain.train`, the same outer
loop as the serial trainer: each step it puts the meta-parameters and LSLR rates
into the object store once, as one flat float32 buffer; each chosen actor copies
it into its replica, runs `task_meta_gradient` on its own K items and returns its
loss, timing and meta-gradients as one flat buffer in the same layout. The
frozen upstream travels once, at setup. A task's meta-gradient depends only on
(parameters, step, task), so the averaged update equals the serial one.

Fault tolerance: an actor that dies (killed, out of memory, its process exits)
is replaced by a fresh one, set up again from the object refs the pool keeps,
and its part of the step is recomputed.
"""

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class ActorConfig:
    num_cpus: float = 0.0  # per actor; 0 shares the node's CPUs (a 2-core laptop holds all nine actors)
    num_gpus: float = 0.0  # per actor; fractions pack several actors on one GPU
    max_restarts: int = 3  # replacements of one actor within one step before the run fails


class FlatLayout:
    """Named tensors <-> one contiguous float32 vector (what crosses the object store)."""

    def __init__(self, shapes: dict):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        sizes = [int(np.prod(shape)) for shape in self.shapes.values()]
        self.offsets = dict(zip(self.shapes, np.cumsum([0] + sizes[:-1]).tolist()))

    @classmethod
    def of(cls, tensors: dict) -> "FlatLayout":
        return cls({name: t.shape for name, t in tensors.items()})

    def flatten(self, tensors: dict) -> np.ndarray:
        if set(tensors) != set(self.shapes):
            raise KeyError(f"tensors {sorted(set(tensors) ^ set(self.shapes))} do not match the layout")
        return torch.cat([tensors[name].detach().reshape(-1).float().cpu() for name in self.shapes]).numpy()

    def unflatten(self, flat: np.ndarray) -> dict:
        return {name: torch.tensor(flat[self.offsets[name]:self.offsets[name] + int(np.prod(shape))]).reshape(shape)
                for name, shape in self.shapes.items()}


class TaskActor:
    """Holds one training annotator's task and a model replica; returns that task's meta-gradients."""

    def __init__(self):
        import ray

        self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.model, self.upstream_key = None, None

    def setup(self, upstream_config, model_state, config, task, task_index, bank, layout) -> str:
        from distmeta.metatrain import build_meta_model
        from distmeta.models.ser import set_scope

        if self.model is None or self.upstream_key != repr(upstream_config):  # the upstream is built once per actor
            self.model = build_meta_model(upstream_config, None, replace(config, ini=False)).to(self.device)
            self.upstream_key = repr(upstream_config)
        self.model.load_state_dict(model_state)
        set_scope(self.model, config.scope)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.config, self.task, self.task_index, self.bank, self.layout = config, task, task_index, bank, layout
        return task.annotator

    def meta_gradient(self, flat: np.ndarray, step: int, second_order: bool) -> tuple[dict, np.ndarray]:
        from distmeta.metatrain import task_meta_gradient

        started = time.perf_counter()
        values = self.layout.unflatten(flat)
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(values[name])
        rates = {name: values["lr/" + name] for name in self.params}
        loss, grads = task_meta_gradient(self.model, self.bank, self.task, self.config, rates, step, self.task_index,
                                         second_order)
        return {"loss": loss, "seconds": time.perf_counter() - started}, self.layout.flatten(grads)

    def pid(self) -> int:
        return os.getpid()


class ActorPool:
    """Task actors kept across trainings (splits, variants): each `setup` hands them new tasks.

    After `setup`, the pool is the `gradients` callable `metatrain.train` takes.
    """

    def __init__(self, config: ActorConfig | None = None, log=print):
        self.config, self.log = config or ActorConfig(), log
        self.actors, self.setups, self.layout = [], [], None
        self.last_metrics: dict[int, dict] = {}

    def _start(self):
        import ray

        remote = ray.remote(TaskActor).options(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus,
                                                max_restarts=0)
        return remote.remote()

    def setup(self, upstream_config, model, config, tasks: list, bank) -> "ActorPool":
        """One actor per task: its items (a subset of `bank`), the model's state, the meta settings."""
        import ray

        while len(self.actors) < len(tasks):
            self.actors.append(self._start())
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.layout = FlatLayout.of({**trainable, **{f"lr/{n}": torch.zeros(config.inner_steps) for n in trainable}})
        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        self.setups = [(upstream_config, state, config, ray.put(task), i, ray.put(bank.subset(task.utterances)), self.layout)
                       for i, task in enumerate(tasks)]
        ray.get([actor.setup.remote(*args) for actor, args in zip(self.actors, self.setups)])
        self.annotators = [task.annotator for task in tasks]
        return self

    def _replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._start()
        ray.get(self.actors[index].setup.remote(*self.setups[index]))

    def __call__(self, learner, step: int, chosen, second_order: bool) -> list[tuple[float, dict]]:
        import ray
        from ray.exceptions import RayActorError

        flat = ray.put(self.layout.flatten(learner.trainable()))  # once per step, shared by every actor
        pending = {i: self.actors[i].meta_gradient.remote(flat, step, second_order) for i in chosen}
        results = []
        for i, future in pending.items():
            for attempt in range(self.config.max_restarts + 1):
                try:
                    metrics, grads = ray.get(future)
                    break
                except RayActorError as err:
                    if attempt == self.config.max_restarts:
                        raise RuntimeError(f"the task actor of annotator {self.annotators[i]!r} died "
                                           f"{attempt + 1} times in outer step {step + 1}") from err
                    if self.log:
                        self.log(f"task actor of annotator {self.annotators[i]!r} died in outer step {step + 1} "
                                 f"({type(err).__name__}); starting a new one and recomputing its meta-gradient")
                    self._replace(i)
                    future = self.actors[i].meta_gradient.remote(flat, step, second_order)
            self.last_metrics[i] = metrics
            results.append((metrics["loss"], self.layout.unflatten(grads)))
        return results

    def pids(self) -> list[int]:
        import ray

        return ray.get([actor.pid.remote() for actor in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
