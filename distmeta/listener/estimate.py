"""A plan before spending (`jobs/meta_train.py --estimate`): the whole run's wall time, GPU-hours and peak
memory, projected from one of each unit of work, measured where the run would do that work.

    measured = measure(config, corpus, splits, inputs)   # on a Ray worker shaped like the run's task actors
    plan = project(config, corpus, splits, measured)     # a table: counts x unit costs / what runs at once

The units run the run's own code on untrained models of the run's shapes (time and memory depend on the
shapes, not on the weights):

    pretraining step    one optimiser step of each pretrained kind on a batch, and one validation batch
    meta-gradient       one training task's meta-gradient, first and second order (an outer step is
                        tasks_per_step of them)
    validation          one validation of the meta-model on the split's validation annotator
    meta-test episode   one episode of every method at Table 1's K (adapt on the support, score the queries)

The counts come from the config and the rotation (splits, Table 2 variants, outer steps, the protocol's
episode plan); each phase is divided by how many of its units run at once (Train runs side by side, task
actors and trainings, episode actors), bounded by what the cluster holds. Not projected: starting Ray, its
actors and Train runs, and MLflow, a fixed cost that matters only for small runs; and the overlap of a
split's meta-test with the next split's meta-training, which makes a real run shorter than the sum.

`check_fits` is the same measurement of the heaviest unit a task actor runs (a second-order
meta-gradient), which the job runs before training whenever the actors ask for a GPU share or a memory
budget: a placement whose measured peak would not fit is refused there, naming what to change.
"""

import math
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

GIB = 2 ** 30


class PeakMemory:
    """The peak memory of the work inside the block: on a GPU what torch allocated at most; on the CPU the
    process's resident set, sampled every few milliseconds."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def _timed(device, work) -> dict:
    with PeakMemory(device) as memory:
        began = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_bytes": memory.peak}


def _device_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def _meta_units(config, corpus, split, inputs, device, orders=(False, True)) -> tuple:
    """One training task's meta-gradient at each order in `orders` (after one untimed warm-up), on `device`:
    (the meta-model, its bank, the validation task, {unit: timing}), what the other units reuse."""
    from distmeta.listener.metatrain import build_meta_model, make_bank, training_pool
    from distmeta.meta.learner import task_meta_gradient

    meta = build_meta_model(config.upstream, None, replace(config.meta, ini=False)).to(device)
    tasks, val_task = split.train_tasks(corpus), split.val_task(corpus)
    bank = make_bank(meta, corpus, training_pool(tasks, val_task), config.meta, config.pretrain.max_seconds, inputs)
    task_meta_gradient(meta, bank, tasks[0], config.meta, 0, 0, False)  # warm-up: first calls allocate and compile
    units = {}
    for second in orders:
        units[f"meta-gradient, {'second' if second else 'first'} order"] = _timed(
            device, lambda: task_meta_gradient(meta, bank, tasks[0], config.meta, 0, 0, second))
    return meta, bank, val_task, units


def _pretrain_units(config, corpus, split, inputs, device) -> dict:
    from distmeta.features import PooledBank, inputs_for
    from distmeta.listener.pretrain import build_model, kinds_for, training_rows

    units = {}
    for kind in kinds_for(config.protocol.methods, config.protocol.table2):
        model = build_model(kind, config.upstream, len(split.train_annotators)).to(device)
        ids, targets, heads = training_rows(corpus, split, kind, config.pretrain.val_fraction, config.pretrain.seed)["train"]
        chosen = list(range(min(config.pretrain.batch_size, len(ids))))
        given = inputs_for(model.upstream, [ids[i] for i in chosen], inputs, corpus, config.pretrain.max_seconds)
        bank = given if kind == "ssl_e" else PooledBank(model.upstream, given)
        batch = {k: v.to(device) for k, v in bank.batch([ids[i] for i in chosen]).items()}
        batch["task"] = heads[chosen].to(device)
        target = torch.as_tensor(targets[chosen]).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.pretrain.lr)

        def step():
            loss = -(target * torch.log_softmax(model(batch), -1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def forward():
            with torch.no_grad():
                model(batch)
        step()  # warm-up
        units[f"pretraining step, {kind}"] = _timed(device, step)
        units[f"pretraining validation batch, {kind}"] = _timed(device, forward)
    return units


def _episode_units(config, corpus, split, inputs, meta, device) -> dict:
    """One episode of every method at Table 1's K, from untrained checkpoints of the pretrained kinds."""
    from safetensors.torch import save_file

    from distmeta.listener.adapters import baseline_adapters, meta_adapter
    from distmeta.listener.pretrain import build_model, kinds_for
    from distmeta.listener.protocol import score_episode
    from distmeta.listener.workers import on_device

    methods = [m for m in config.protocol.methods if m != "Meta-PerSER"]
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = {}
        for kind in kinds_for(config.protocol.methods, config.protocol.table2):
            checkpoints[kind] = Path(folder) / f"{kind}.safetensors"
            model = build_model(kind, config.upstream, len(split.train_annotators))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoints[kind]))
        adapters = baseline_adapters(methods, corpus, split, checkpoints, config.upstream, config.protocol.adapt,
                                     config.pretrain.max_seconds, config.protocol.ceiling, inputs)
    if "Meta-PerSER" in config.protocol.methods:
        state = {k: v.cpu() for k, v in meta.state_dict().items()}
        adapters["Meta-PerSER"] = meta_adapter("Meta-PerSER", corpus, split, config.upstream, state, config.meta,
                                               config.pretrain.max_seconds, inputs)
    if device.type == "cuda":
        on_device(adapters, device)
    test, units = split.test_task(corpus), {}
    for name in adapters:
        units[f"meta-test episode, {name}"] = _timed(
            device, lambda: score_episode(adapters, test, config.protocol, {}, 0, config.protocol.shots, name))
    return units


def _measure_here(config, corpus, split, inputs, full: bool) -> dict:
    from distmeta.meta.learner import validation_metrics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta, bank, val_task, units = _meta_units(config, corpus, split, inputs, device, (False, True) if full else (True,))
    if full:
        units["validation"] = _timed(device, lambda: validation_metrics(meta, bank, val_task, config.meta))
        units.update(_pretrain_units(config, corpus, split, inputs, device))
        units.update(_episode_units(config, corpus, split, inputs, meta, device))
    return {"device": str(device), "device_bytes": _device_bytes(device), "threads": torch.get_num_threads(),
            "units": units}


def measure(config, corpus, splits: dict, inputs, full: bool = True) -> dict:
    """Every unit (or with `full` false only the second-order meta-gradient), timed on a Ray worker with the
    task actors' resources (`config.actors`: its GPU share, CPUs and memory), on the first split."""
    import ray

    from distmeta.cluster import placeable

    split = next(iter(splits.values()))[0]
    actors = config.actors
    options = {"num_cpus": actors.num_cpus, "num_gpus": actors.num_gpus, **({"memory": actors.memory} if actors.memory else {})}
    # a shape no node holds is refused here, naming the resource, rather than left pending forever
    placeable("task actors (actors.num_cpus, actors.num_gpus, actors.memory_gb)", actors.num_cpus, actors.num_gpus,
              actors.memory)
    remote = ray.remote(_measure_here).options(**options, max_retries=0)
    return ray.get(remote.remote(config, corpus, split, inputs, full))


def check_fits(config, corpus, splits: dict, inputs, log=print) -> None:
    """Refuse (SystemExit) a task-actor placement whose measured peak does not fit what each actor gets: on
    a GPU its share of the GPU's memory (`actors.num_gpus`), else its memory budget (`actors.memory_gb`)."""
    actors = config.actors
    if not config.distributed or not (actors.num_gpus or actors.memory_gb):
        return
    measured = measure(config, corpus, splits, inputs, full=False)
    peak = measured["units"]["meta-gradient, second order"]["peak_bytes"]
    if measured["device"].startswith("cuda") and actors.num_gpus:
        budget = measured["device_bytes"] * min(1.0, actors.num_gpus)
        where = f"actors.num_gpus={actors.num_gpus:g} of a {measured['device_bytes'] / GIB:.1f} GiB GPU"
        fix = "raise actors.num_gpus (fewer actors a GPU), or lower meta.shots"
    elif actors.memory_gb:
        budget, where = actors.memory, f"actors.memory_gb={actors.memory_gb:g}"
        fix = "raise actors.memory_gb, or lower meta.shots"
    else:
        return
    log(f"task actor: a second-order meta-gradient peaks at {peak / GIB:.2f} GiB; {where} gives it {budget / GIB:.2f} GiB")
    if peak > budget:
        raise SystemExit(f"the task actors do not fit: a second-order meta-gradient of {config.upstream.name} peaks at "
                         f"{peak / GIB:.2f} GiB (measured on {measured['device']}), but {where} gives each actor "
                         f"{budget / GIB:.2f} GiB; {fix}")


def episode_counts(config, corpus, splits: dict) -> dict:
    """{method: episodes scored} over the run, as `protocol.run_episodes` plans them (names sharing one model,
    Meta-PerSER and its Table 2 twin, score once: the twin counts none)."""
    from distmeta.listener.metatrain import meta_model_path, meta_variants
    from distmeta.listener.protocol import episode_plan

    protocol, counts = config.protocol, {}
    for scenario, scenario_splits in splits.items():
        variants = meta_variants(config.meta, protocol.methods, protocol.table2, scenario)
        for split in scenario_splits:
            test = split.test_task(corpus)
            methods = list(protocol.methods) + [m for m in variants if m.startswith("Meta[")]
            plan = episode_plan(protocol, methods, len(test))
            owner = {}  # model file -> the first variant using it
            for name, meta in variants.items():
                owner.setdefault(meta_model_path(config.models_dir, scenario, split.test_annotator, meta), name)
            scorer = {name: owner[meta_model_path(config.models_dir, scenario, split.test_annotator, meta)]
                      for name, meta in variants.items()}
            for episode in dict.fromkeys((seed, shots, scorer.get(m, m)) for seed, shots, m in plan):
                counts[episode[2]] = counts.get(episode[2], 0) + 1
    return counts


def _cluster() -> dict:
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return {r: sum(node.get(r, 0.0) for node in nodes) for r in ("CPU", "GPU")}


def project(config, corpus, splits: dict, measured: dict, setup_seconds: float = 0.0) -> pd.DataFrame:
    """The run's phases: units, unit seconds, compute seconds, how many at once, wall seconds, GPU-hours and
    the peak memory of one unit (GiB), from `measure`'s units; the last row sums them."""
    from distmeta.listener.metatrain import meta_model_path, meta_variants
    from distmeta.listener.pretrain import kinds_for, training_rows
    from distmeta.meta.learner import chosen_tasks

    units, cluster = measured["units"], _cluster()
    unit = lambda name: units.get(name, {"seconds": 0.0, "peak_bytes": 0})
    rows = [{"phase": "setup (corpus, inputs)", "units": 1, "unit_s": setup_seconds, "compute_s": setup_seconds,
             "at_once": 1, "gpus": 0.0, "peak_gib": 0.0}]

    # Pretraining: every kind the job trains, every split; Train runs side by side share the cluster.
    pre, kinds = config.pretrain, kinds_for(config.protocol.methods, config.protocol.table2)
    compute, peak, count = 0.0, 0, 0
    for split in (s for scenario_splits in splits.values() for s in scenario_splits):
        for kind in kinds:
            parts = training_rows(corpus, split, kind, pre.val_fraction, pre.seed)
            steps = pre.epochs * math.ceil(len(parts["train"][0]) / pre.batch_size)
            val = pre.epochs * math.ceil(len(parts["val"][0]) / pre.batch_size)
            compute += steps * unit(f"pretraining step, {kind}")["seconds"] + val * unit(f"pretraining validation batch, {kind}")["seconds"]
            peak, count = max(peak, unit(f"pretraining step, {kind}")["peak_bytes"]), count + steps
    workers = max(1, pre.parallel) * max(1, pre.num_workers)
    at_once = min(workers, cluster["GPU"] if pre.use_gpu else max(1.0, cluster["CPU"]))
    rows.append({"phase": "pretraining (SSL-E, Linear, Multi)", "units": count, "unit_s": compute / max(1, count),
                 "compute_s": compute, "at_once": at_once, "gpus": float(workers if pre.use_gpu else 0), "peak_gib": peak / GIB})

    # Meta-training: each model file trains once; an outer step is its chosen tasks' meta-gradients.
    first, second = unit("meta-gradient, first order"), unit("meta-gradient, second order")
    grads = compute = validations = 0.0
    per_training = 0
    for scenario, scenario_splits in splits.items():
        for split in scenario_splits:
            n_tasks = len(split.train_annotators)
            trained = {meta_model_path(config.models_dir, scenario, split.test_annotator, m): m
                       for m in meta_variants(config.meta, config.protocol.methods, config.protocol.table2, scenario).values()}
            for meta in trained.values():
                tasks = len(chosen_tasks(np.random.default_rng(0), n_tasks, meta))
                first_steps = int(meta.da_first_order_fraction * meta.outer_steps) if meta.da else 0
                grads += meta.outer_steps * tasks
                compute += tasks * (first_steps * (first or second)["seconds"] + (meta.outer_steps - first_steps) * second["seconds"])
                validations += sum(1 for s in range(meta.outer_steps) if (s + 1) % meta.val_every == 0 or s + 1 == meta.outer_steps)
                per_training = max(per_training, min(tasks, config.actors.max_actors or n_tasks))
    actors = max(1, config.parallel) * max(1, per_training) if config.distributed else 1
    slots = (cluster["GPU"] / config.actors.num_gpus if config.actors.num_gpus else max(1.0, cluster["CPU"]))
    at_once = max(1.0, min(actors, slots))
    gpus = actors * config.actors.num_gpus if config.distributed else 0.0
    rows.append({"phase": "meta-training: meta-gradients", "units": int(grads), "unit_s": compute / max(1, grads),
                 "compute_s": compute, "at_once": at_once, "gpus": gpus,
                 "peak_gib": max(first["peak_bytes"], second["peak_bytes"]) / GIB})
    rows.append({"phase": "meta-training: validations", "units": int(validations), "unit_s": unit("validation")["seconds"],
                 "compute_s": validations * unit("validation")["seconds"], "at_once": max(1, config.parallel), "gpus": 0.0,
                 "peak_gib": unit("validation")["peak_bytes"] / GIB})

    # Meta-test: every method's episodes on the episode actors (Table 2's variants cost Meta-PerSER's episode).
    counts, compute, peak = episode_counts(config, corpus, splits), 0.0, 0
    for method, n in counts.items():
        measured_as = unit(f"meta-test episode, {'Meta-PerSER' if method.startswith('Meta[') else method}")
        compute, peak = compute + n * measured_as["seconds"], max(peak, measured_as["peak_bytes"])
    workers = config.protocol.workers or 1
    slots = cluster["GPU"] / config.protocol.worker_gpus if config.protocol.worker_gpus else max(1.0, cluster["CPU"])
    rows.append({"phase": "meta-test episodes", "units": sum(counts.values()), "unit_s": compute / max(1, sum(counts.values())),
                 "compute_s": compute, "at_once": max(1.0, min(workers, slots)),
                 "gpus": config.protocol.workers * config.protocol.worker_gpus, "peak_gib": peak / GIB})

    plan = pd.DataFrame(rows).set_index("phase")
    plan["wall_s"] = plan["compute_s"] / plan["at_once"]
    plan["gpu_hours"] = plan["wall_s"] * plan["gpus"] / 3600
    total = {"units": plan["units"].sum(), "compute_s": plan["compute_s"].sum(), "wall_s": plan["wall_s"].sum(),
             "gpu_hours": plan["gpu_hours"].sum(), "peak_gib": plan["peak_gib"].max()}
    plan.loc["whole run"] = pd.Series(total)
    return plan[["units", "unit_s", "compute_s", "at_once", "wall_s", "gpus", "gpu_hours", "peak_gib"]]

