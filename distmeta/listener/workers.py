"""Episode actors: the meta-test's episodes scored on Ray actors, on a GPU share when configured.

    workers = EpisodeWorkers(2, num_gpus=0.25)      # protocol.workers, protocol.worker_gpus
    rows = run_episodes(adapters, task, config, labels, workers=workers)

Episodes are independent and each adapter seeds itself by the episode, so the rows equal the serial
`run_episodes`' (up to float rounding: an actor runs torch with its own thread count). On a small model most
kernels barely use a second thread (attention's CPU kernel: one), so two one-CPU actors score a 2-core
machine's episodes ~1.4x faster than one process with two threads. The adapters (their models, banks and
corpus) reach the actors through the object store once per split: nodes need no shared disk. An actor given
a GPU share moves the adapters' models there (inputs follow the model, `SERModel.pooled`).

No pool waits forever: a demand no node of the cluster can ever meet (more CPUs or GPUs per actor than any
node has) is refused at start, naming the resource; otherwise the pool starts every actor, hands episodes to
those Ray has placed as they come up, and while none is placed (another phase's actors hold the resources)
scores episodes in the driver itself. Episodes are handed out one at a time as actors free up, the slowest
methods' first; an actor that dies is replaced and set up again, and its episode repeated, up to
`max_restarts` times in a run.
"""

from distmeta.cluster import placeable
from distmeta.data.scenarios import Task
from distmeta.listener.protocol import ProtocolConfig, score_episode, slowness_rank

WAIT_FOR_ACTORS_S = 5.0  # with no actor placed after this long, the driver starts scoring episodes itself


class EpisodeActor:
    """A Ray actor holding one split's adapters and test task; scores the episodes it is handed."""

    def setup(self, adapters: dict, task: Task, config: ProtocolConfig, labels: dict) -> None:
        self.args = adapters, task, config, labels
        device = accelerator()
        if device != "cpu":
            on_device(adapters, device)

    def score(self, seed: int, shots: int, name: str) -> dict:
        return score_episode(*self.args, seed, shots, name)

    def gpu_ids(self) -> list:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]


def on_device(adapters: dict, device) -> None:
    """Move the adapters' models to `device` (their inputs follow the model)."""
    import torch

    for adapter in adapters.values():
        for value in vars(adapter).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)


def accelerator() -> str:
    """"cuda" in a Ray actor given a GPU share on a machine with CUDA, else "cpu"."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class EpisodeWorkers:
    """`count` Ray actors (`num_cpus` and `num_gpus` each) that score a split's episodes in parallel."""

    def __init__(self, count: int, num_cpus: float = 1.0, num_gpus: float = 0.0, max_restarts: int = 3):
        self.count, self.num_cpus, self.num_gpus, self.max_restarts = count, num_cpus, num_gpus, max_restarts
        self.actors = []

    def _start(self):
        import ray

        return ray.remote(EpisodeActor).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0).remote()

    def run(self, adapters: dict, task: Task, config: ProtocolConfig, labels: dict, plan: list, progress) -> list[dict]:
        import ray
        from ray.exceptions import RayActorError

        placeable("episode actors (protocol.workers, protocol.worker_gpus)", self.num_cpus, self.num_gpus)
        while len(self.actors) < self.count:
            self.actors.append(self._start())
        setup = (ray.put(adapters), task, config, labels)
        placing = {actor.setup.remote(*setup): a for a, actor in enumerate(self.actors)}  # set up once placed
        order = sorted(range(len(plan)), key=lambda i: slowness_rank(plan[i][2]))  # stable: plan order within a rank
        rows, queue, running, ready, restarts, waited = [None] * len(plan), order[::-1], {}, set(), 0, False
        while queue or running:
            busy = {a for a, _ in running.values()}
            for a in sorted(ready - busy):
                if queue:
                    i = queue.pop()
                    running[self.actors[a].score.remote(*plan[i])] = (a, i)
            patience = None if running or ready else 0.0 if waited else WAIT_FOR_ACTORS_S
            done, _ = ray.wait([*running, *placing], num_returns=1, timeout=patience)
            if not done:  # no actor placed yet: the driver scores episodes itself meanwhile, looking in between
                waited = True
                i = queue.pop()
                rows[i] = score_episode(adapters, task, config, labels, *plan[i])
                progress(sum(row is not None for row in rows))
                continue
            if done[0] in placing:
                a = placing.pop(done[0])
                try:
                    ray.get(done[0])
                    ready.add(a)
                except RayActorError:
                    restarts = self._replace(a, restarts, placing, setup)
                continue
            a, i = running.pop(done[0])
            try:
                rows[i] = ray.get(done[0])
            except RayActorError:
                ready.discard(a)
                restarts = self._replace(a, restarts, placing, setup)
                queue.append(i)
                continue
            progress(sum(row is not None for row in rows))
        return rows

    def _replace(self, a: int, restarts: int, placing: dict, setup: tuple) -> int:
        import ray

        restarts += 1
        if restarts > self.max_restarts:
            raise RuntimeError(f"episode actors died {restarts} times in one run (max_restarts {self.max_restarts})")
        ray.kill(self.actors[a], no_restart=True)
        self.actors[a] = self._start()
        placing[self.actors[a].setup.remote(*setup)] = a
        return restarts

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
