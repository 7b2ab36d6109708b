"""Connecting a job to Ray: the one way every job does it.

Under `ray job submit` Ray sets `RAY_ADDRESS`, so a job joins the cluster it was
submitted to; run by hand it starts a local instance; a job's `ray_address`
setting overrides both (e.g. `ray_address=auto` to join the node's cluster).

A local instance starts with its dashboard (bound to 127.0.0.1): Ray's State API
lives there, and Ray Train's placement-group cleaner asks it, every second of a
training, whether the run's controller is alive. Without it each ask fails with
a warning line (about 1,200 of them in the default main job).

Ray merges log lines of different workers that differ only in their numbers ("[repeated 2x
across cluster]"); with models trained side by side that drops one run's progress lines (epoch 3
of one model and of another read alike). Ray reads RAY_DEDUP_LOGS once, when it is imported, and
every job imports this module before Ray, so the default is set here, at import.
"""

import os
from contextlib import contextmanager

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def connect(address: str = "") -> None:
    """Join the Ray cluster at `address` ("" = $RAY_ADDRESS when set, else a new local instance);
    nothing happens when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    else:
        ray.init(address=address)


@contextmanager
def beside_workers():
    """One torch thread in this process (the job's driver) while Ray workers compute on the same cores.

    The driver's work there is small ops between waits on its actors (validations, the outer step,
    dispatching episodes). With a second intra-op thread, OpenMP keeps that thread spinning after each op,
    waiting for the next one, on a core the workers need: a driver alternating small matmuls with waits on
    a task used 2.0 s of CPU with 2 threads against 0.7 s with one, for the same work in the same time."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def placeable(what: str, num_cpus: float, num_gpus: float, memory: float = 0.0) -> int:
    """How many actors of this shape (`memory`: bytes of Ray's memory resource) the cluster's alive nodes can
    hold at once (their total resources, not what is free now); a shape no node can hold at all is refused
    (ValueError naming the resource), since Ray would leave such an actor pending forever."""
    import math

    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    shape = (("CPU", num_cpus), ("GPU", num_gpus), ("memory", memory))
    for resource, amount in shape:
        most = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if amount > most:
            shown = (f"{amount / 2 ** 30:.2f} GiB of", f"{most / 2 ** 30:.2f} GiB of") if resource == "memory" else (f"{amount:g}", f"{most:g}")
            raise ValueError(f"{what} ask for {shown[0]} {resource} each, but no node of the Ray cluster has more than "
                             f"{shown[1]} {resource}")
    fits = [min([math.floor(node.get(r, 0.0) / a + 1e-9) for r, a in shape if a > 0], default=math.inf) for node in nodes]
    return sum(fits) if fits else 0
