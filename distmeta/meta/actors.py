"""Distributed meta-training on Ray: task actors hold the training tasks (annotators or speakers), the driver aggregates.

    actors = ActorPool(ActorConfig(num_gpus=0.25))
    result = meta_train_split(corpus, split, upstream, ssl_e, meta, actors=actors)   # listener/metatrain.py
    result = speaker.maml.meta_train(bank, data, pretrained, meta, actors=actors)    # speaker tasks

`ActorPool.setup` gives each training task (an annotator's labels, or a speaker's
utterances) to one `TaskActor`: its items, their inputs (cached pooled features
for frozen-upstream scopes, audio for `entire`, a speaker's frames) and a model
replica, built by a `replica` object (the listener path's `ListenerReplica`, the
speaker path's `ClassifierReplica`). With `max_actors` below the number of tasks, each actor
holds several tasks (task i on actor i mod max_actors). The driver is
`learner.train`, the same outer loop as the serial trainer: each step it puts
the meta-model's trainable parameters (the model's and, with LSLR, its rates)
into the object store once, as one flat float32 buffer; each actor holding a
chosen task copies it into its replica, runs `task_meta_gradients` on its chosen
tasks' items (together, on pooled features) and returns their losses, timings and meta-gradients as flat
buffers in the same layout. The frozen upstream travels once, at setup. A task's
meta-gradient depends only on (parameters, step, task), so the averaged update
equals the serial one.

Fault tolerance: every call the pool makes on an actor (setting up a split, an
outer step's meta-gradient) goes through `ActorPool._call`. An actor that dies
before answering (killed, out of memory, its node preempted or drained) is
replaced by a fresh one, set up again from the object refs the pool keeps, and
only its own call is repeated, up to `max_restarts` times per call. An actor
that died while idle (between steps, during validation, between splits) is
found and replaced at its next call the same way; at teardown a dead actor
needs nothing. A task's results depend only on (parameters, step, task), so a
run with deaths equals an undisturbed one.

Chaos testing: with `DISTMETA_CHAOS=SEED:PATH` in the driver's environment the
pool kills its own actors' processes (SIGKILL) at four moments drawn from SEED
(`Chaos`) and records each kill in PATH; `tests/jobs/test_ray_job_submit.py`
runs a submitted job that way and compares its results with an undisturbed run.
"""

import json
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from distmeta.cluster import placeable
from distmeta.meta.learner import SerialGradients, task_meta_gradients
from distmeta.models.ser import trainable_parameters


@dataclass
class ActorConfig:
    num_cpus: float = 0.0  # per actor; 0 shares the node's CPUs (a 2-core laptop can hold nine actors)
    num_gpus: float = 0.0  # per actor; fractions pack several actors on one GPU
    max_restarts: int = 3  # replacements of one actor within one call before the run fails
    max_actors: int = 0  # 0: one actor per task; fewer: each actor holds several tasks (many speakers, few cores)
    # Host memory per actor (GiB), reserved through Ray's `memory` resource; 0: none reserved. With it (or a GPU
    # share) the job measures a second-order meta-gradient's peak before training and refuses what cannot fit.
    memory_gb: float = 0.0

    @property
    def memory(self) -> int:
        """memory_gb in bytes, as Ray's `memory` resource counts it."""
        return int(self.memory_gb * 2 ** 30)


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
    """Holds one or more training tasks and a model replica; returns those tasks' meta-gradients."""

    def __init__(self):
        import ray

        self.device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        self.model, self.replica_key = None, None

    def setup(self, replica, shared, meta_state, config, tasks: list, bank, layout) -> list[str]:
        """`tasks`: [(task index, task)]; `shared`: what the replica builds from (sent once per pool)."""
        if self.model is None or self.replica_key != replica.key:  # built once per actor
            self.model = replica.model(config, shared).to(self.device)
            self.replica_key = replica.key
        self.meta = replica.meta_model(self.model, config).to(self.device)
        self.meta.load_state_dict(meta_state)
        self.params = trainable_parameters(self.meta)
        self.config, self.tasks, self.bank, self.layout = config, dict(tasks), bank, layout
        return [task.annotator for _, task in tasks]

    def meta_gradient(self, flat: np.ndarray, step: int, second_order: bool, indices: list) -> list:
        """[(metrics, flat meta-gradients)] of the tasks at `indices`, in order."""
        values = self.layout.unflatten(flat)
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(values[name])
        started = time.perf_counter()
        results = task_meta_gradients(self.meta, self.bank, [(i, self.tasks[i]) for i in indices], self.config, step,
                                      second_order)
        seconds = (time.perf_counter() - started) / len(indices)  # tasks computed together share the time
        return [({"loss": loss, "seconds": seconds}, self.layout.flatten(grads)) for loss, grads in results]

    def pid(self) -> int:
        return os.getpid()


class Chaos:
    """Kills one task actor's process at each of four moments drawn from a seed, and records each kill.

    setup           while the first training's actors set up (its call in flight)
    step            in flight in an outer step of one training
    validation      idle, while the driver validates after a `val_every` step of the other training
    between splits  idle, before the second training's setup

    Each kill is appended to the record file as a JSON line (moment, training, step, annotator, pid,
    time). The driver signals the process itself, so this is for single-machine clusters (tests).
    """

    def __init__(self, seed: int, record_path):
        self.rng, self.record_path = np.random.default_rng(seed), record_path
        self.step_training = int(self.rng.integers(1, 3))  # the other training gets the validation kill
        self.plan: dict[str, tuple] = {}
        self.training = 0

    @classmethod
    def from_environment(cls) -> "Chaos | None":
        spec = os.environ.get("DISTMETA_CHAOS", "")
        if not spec:
            return None
        seed, _, path = spec.partition(":")
        return cls(int(seed), path or "chaos.jsonl")

    def new_training(self, config) -> None:
        """Draw this training's moments: {moment: (a draw choosing the actor, outer step or None)}."""
        self.training += 1
        t, pick = self.training, lambda: int(self.rng.integers(1 << 30))
        validations = [s for s in range(config.val_every, config.outer_steps, config.val_every)]
        self.plan = {}
        if t == 1:
            self.plan["setup"] = (pick(), None)
        if t == 2:
            self.plan["between splits"] = (pick(), None)
        if t == self.step_training:
            self.plan["step"] = (pick(), int(self.rng.integers(1, config.outer_steps + 1)))
        elif t <= 2 and validations:
            self.plan["validation"] = (pick(), int(self.rng.choice(validations)))

    def target(self, pool, moment: str, step: int | None = None, candidates=None):
        """(actor index, its pid) if `moment` (at 1-based outer `step`) is planned now: one of `candidates`
        (default: every actor of the current training), asked while it is idle."""
        import ray

        planned = self.plan.get(moment)
        if planned is None or planned[1] != step:
            return None
        del self.plan[moment]
        candidates = list(range(len(pool.setups)) if candidates is None else candidates)
        index = candidates[planned[0] % len(candidates)]
        return index, ray.get(pool.actors[index].pid.remote())

    def kill(self, pool, target, moment: str, step: int | None = None) -> None:
        index, pid = target
        os.kill(pid, signal.SIGKILL)
        record = {"moment": moment, "training": self.training, "step": step, "annotator": pool.annotators[index],
                  "pid": pid, "time": time.time()}
        with open(self.record_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if pool.log:
            pool.log(f"chaos: killed the task actor of {record['annotator']!r} ({moment})")


class ActorPool:
    """Task actors kept across trainings (splits, variants): each `setup` hands them new tasks.

    After `setup`, the pool is the `gradients` callable `learner.train` takes.
    """

    def __init__(self, config: ActorConfig | None = None, log=print):
        self.config, self.log = config or ActorConfig(), log
        self.actors, self.setups, self.layout, self.annotators, self.holder = [], [], None, [], []
        self.shared_refs = {}  # replica key -> object ref of what its models are built from (sent once)
        self.last_metrics: dict[int, dict] = {}  # task index -> its last meta-gradient's loss and seconds
        self.chaos = Chaos.from_environment()

    def _start(self):
        import ray

        memory = {"memory": self.config.memory} if self.config.memory else {}
        remote = ray.remote(TaskActor).options(num_cpus=self.config.num_cpus, num_gpus=self.config.num_gpus,
                                                max_restarts=0, **memory)
        return remote.remote()

    def setup(self, replica, meta, config, tasks: list, bank) -> "ActorPool":
        """Each task to one actor (several per actor beyond `max_actors`): its items (a subset of `bank`),
        the meta-model's state, the meta settings; `replica` builds the actors' models."""
        import ray

        n = min(len(tasks), self.config.max_actors or len(tasks))
        fits = placeable("task actors (actors.num_cpus, actors.num_gpus, actors.memory_gb)", self.config.num_cpus,
                         self.config.num_gpus, self.config.memory)
        if fits < n:  # Ray would leave the actors beyond what the cluster holds pending forever
            if self.log and not self.actors:
                self.log(f"task actors: the cluster holds {fits} of {self.config.num_cpus:g} CPU and {self.config.num_gpus:g} GPU "
                         f"each; {len(tasks)} tasks on {fits} actors")
            n = fits
        while len(self.actors) < n:
            self.actors.append(self._start())
        self.holder = [i % n for i in range(len(tasks))]  # task index -> actor index
        held = [[(i, task) for i, task in enumerate(tasks) if self.holder[i] == a] for a in range(n)]
        self.layout = FlatLayout.of(trainable_parameters(meta))
        state = ray.put({k: v.detach().cpu() for k, v in meta.state_dict().items()})
        if replica.key not in self.shared_refs:
            self.shared_refs[replica.key] = ray.put(replica.shared())
        shared = self.shared_refs[replica.key]
        self.setups = [(replica, shared, state, config, ray.put(part),
                        ray.put(bank.subset([u for _, task in part for u in task.utterances])), self.layout)
                       for part in held]
        self.annotators = [", ".join(task.annotator for _, task in part) for part in held]
        if self.chaos:
            self.chaos.new_training(config)
            idle = self.chaos.target(self, "between splits")
            if idle:
                self.chaos.kill(self, idle, "between splits")
        self._call(range(n), "setup", lambda a: self.setups[a], "setting up")
        return self

    def _call(self, indices, method: str, args_of, what: str, step: int | None = None) -> dict:
        """`method(*args_of(index))` on the actors at `indices`, concurrently; {index: result}. An actor that
        has died (now or while idle) is replaced by a fresh one, set up again from the kept refs, and only
        its call is repeated. `step`: the 1-based outer step of a meta-gradient call."""
        import ray
        from ray.exceptions import RayActorError

        def submit(i):
            return getattr(self.actors[i], method).remote(*args_of(i))

        moment = "setup" if method == "setup" else "step" if method == "meta_gradient" else None
        chaos = self.chaos.target(self, moment, step, indices) if self.chaos and moment else None
        pending, results, restoring = {i: submit(i) for i in indices}, {}, {}
        if chaos:  # the call is in flight now
            self.chaos.kill(self, chaos, moment, step)
        for i in pending:
            for attempt in range(self.config.max_restarts + 1):
                try:
                    results[i] = ray.get(pending[i])
                    break
                except RayActorError as err:
                    if attempt == self.config.max_restarts:
                        raise RuntimeError(f"the task actor of {self.annotators[i]!r} died {attempt + 1} times {what}") from err
                    if self.log:
                        self.log(f"task actor of {self.annotators[i]!r} died {what} ({type(err).__name__}); "
                                 f"starting a new one and repeating its part")
                    ray.kill(self.actors[i], no_restart=True)
                    self.actors[i] = self._start()
                    if method != "setup" and i < len(self.setups):  # queued first: an actor runs its calls in order
                        restoring[i] = self.actors[i].setup.remote(*self.setups[i])
                    pending[i] = submit(i)
        ray.get(list(restoring.values()))  # already done; raises if setting a replacement up failed
        return results

    def __call__(self, learner, step: int, chosen, second_order: bool) -> list[tuple[float, dict]]:
        import ray

        flat = ray.put(self.layout.flatten(learner.trainable()))  # once per step, shared by every actor
        asked = {}
        for i in chosen:
            asked.setdefault(self.holder[i], []).append(i)
        answers = self._call(list(asked), "meta_gradient", lambda a: (flat, step, second_order, asked[a]),
                             f"in outer step {step + 1}", step + 1)
        by_task = {i: answer for a, indices in asked.items() for i, answer in zip(indices, answers[a])}
        results = []
        for i in chosen:  # the serial trainer's order, so the averaged update is summed the same way
            metrics, grads = by_task[i]
            self.last_metrics[i] = metrics
            results.append((metrics["loss"], self.layout.unflatten(grads)))
        idle = self.chaos.target(self, "validation", step + 1) if self.chaos else None
        if idle:  # the driver validates next, while every actor waits
            self.chaos.kill(self, idle, "validation", step + 1)
        return results

    def pids(self) -> list[int]:
        """The actors' process ids (a dead actor is replaced first)."""
        return list(self._call(range(len(self.actors)), "pid", lambda a: (), "when asked its pid").values())

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)  # a no-op for an actor that has died already
        self.actors = []


def task_gradients(actors: "ActorPool | None", replica, meta, config, tasks: list, bank):
    """The `gradients` callable of `learner.train`: the tasks' meta-gradients in this process (no `actors`:
    the serial reference), or on `actors`, each of which builds its model with `replica`."""
    if actors is None:
        return SerialGradients(bank, tasks)
    return actors.setup(replica, meta, config, tasks, bank)
