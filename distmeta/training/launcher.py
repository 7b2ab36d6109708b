"""The one Ray Train launcher: SSL-E/Linear/Multi pretraining and MetaICL both train through `train_many`.

On a cluster the nodes share no disk except Ray's storage, so:

- what the workers need reaches them through the object store (`shared`: audio, frame banks, upstream
  checkpoints, and the saved models a request starts from);
- what they produce comes back as Ray Train checkpoints in the storage (`storage`: a shared folder or a
  pyarrow filesystem URI such as s3://bucket/distmeta): a finished model's checkpoint holds its weights
  and sidecar, a progress checkpoint what resuming an interrupted model needs;
- only the driver writes `models_dir`: after the run it copies each finished model out of its checkpoint.

Every checkpoint also lists the models finished so far and carries the states that unfinished requests
start from, so a worker group restarted after a worker died skips what is done and resumes what was
interrupted. A run is named by what it trains, so a job started again after its driver died picks up the
same run's checkpoints; a checkpoint counts only for a request with exactly its settings.
"""

import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distmeta.cluster import placeable
from distmeta.io import settings_digest, write_json
from distmeta.training.artifacts import is_done, save_model

@dataclass(kw_only=True)  # keyword-only, as training.fit.TrainConfig
class RayTrainScaling:
    """Where a Ray Train run trains; every config trained through `train_many` has these (a model's cache key
    leaves out all but num_workers: `artifacts.shaping`)."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 0  # 0: the cluster's CPUs shared out among the workers (Ray sets torch's threads to it)


_USER_REPORT_WAIT = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "")  # set before this module was imported
MANIFEST = "launcher.json"  # in every checkpoint: finished models, carried start states, what it holds


def storage_path(storage: str, default) -> str:
    """Ray's storage for a job: `storage` as given when it is a URI (s3://, gs://, ...), resolved when it is
    a folder, and `default` (a local folder: one node) when it is empty."""
    return storage if "://" in storage else str(Path(storage or default).resolve())


def _key(request: dict) -> dict:
    return {"out_path": request["out_path"], "digest": settings_digest(request["settings"])}


def train_many(loop, requests: list[dict], shared: dict, scaling, storage: str, name: str,
               max_failures: int = 2, on_run_done=None, report_wait_s: float = 0.1) -> list[Path]:
    """Train every request not saved yet in Ray Train `TorchTrainer` runs; returns the requests' paths.

    A request is {"settings": what shapes the model, "out_path": where the driver saves it, "init": the
    out_path of the model it starts from, or ""}. `loop(worker)` runs on every worker with a `Worker`;
    `shared` values reach the workers through the object store. `scaling` has num_workers, use_gpu and
    cpus_per_worker (0: the cluster's CPUs shared out among all workers), and may have `parallel`: that
    many runs side by side, each training its share of the requests (`share_out`). A small model trains
    faster as two one-CPU runs than as one two-CPU run: most of its kernels barely use a second thread.
    `on_run_done(runs_left)` is called as each run ends (its finished models saved), with how many still train:
    a caller can use the cores a finished run gave back while the others go on. `report_wait_s`: how often each
    run's controller collects reports (see below); a loop that reports rarely can afford a longer wait.
    """
    import ray

    paths = [Path(r["out_path"]) for r in requests]
    todo = [{**r, "out_path": str(Path(r["out_path"]).resolve()), "init": str(Path(r["init"]).resolve()) if r.get("init") else ""}
            for r in requests if not is_done(r["out_path"], r["settings"])]
    if not todo:
        return paths
    if not ray.is_initialized():
        raise RuntimeError(f"{name}: training runs on Ray: call ray.init(...) in the job first")
    in_run = {r["out_path"] for r in todo}
    saved_starts = {r["init"]: load_file(r["init"]) for r in todo if r["init"] and r["init"] not in in_run}
    shared = {key: ray.put(value) for key, value in {**shared, "saved_starts": saved_starts}.items()}
    # Ray Train replaces `print` on its workers with a logger that also tees to stdout: every progress
    # line would reach the driver twice. The setting travels from this process to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # A worker's `ray.train.report` waits until the run's controller collects the previous one, which it
    # does once per health-check interval (2 s by default): seconds lost per epoch of every model,
    # minutes over the default job's pretraining. But polling often keeps part of a core busy per run, so
    # loops that report every few minutes wait longer. Ray Train sends the setting from this
    # process's environment to each run's controller as it starts; one the user set is kept.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = _USER_REPORT_WAIT or str(report_wait_s)
    shares = share_out(todo, getattr(scaling, "parallel", 1))
    cpus = scaling.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // (scaling.num_workers * len(shares)))
    if not scaling.cpus_per_worker:  # the shared-out CPUs of a worker must fit on one node
        cpus = max(1, min(cpus, int(max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")))))
    # No run waits forever: a worker no node can hold is refused (naming the resource), a run needing more
    # workers than the cluster holds too, and runs side by side are as many as fit at once.
    fits = placeable(f"{name}: Ray Train workers (num_workers, use_gpu, cpus_per_worker)", cpus, float(scaling.use_gpu))
    if fits < scaling.num_workers:
        raise ValueError(f"{name}: {scaling.num_workers} Ray Train workers of {cpus} CPU{' and 1 GPU' if scaling.use_gpu else ''} "
                         f"each, but the cluster holds {fits}; lower num_workers")
    if len(shares) > fits // scaling.num_workers:
        shares = share_out(todo, fits // scaling.num_workers)
    running, lock = [len(shares)], threading.Lock()

    def run(share):
        try:
            return _fit(loop, share, shared, scaling, cpus, storage, name, max_failures)
        finally:
            with lock:
                running[0] -= 1
                left = running[0]
            if on_run_done:
                on_run_done(left)

    if len(shares) == 1:
        errors = [run(shares[0])]
    else:  # each run's fit() waits on its own controller actor: one driver thread per run
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(shares)) as pool:
            errors = list(pool.map(run, shares))
    missing = [str(p) for p in paths if not p.is_file()]
    if any(errors) or missing:
        raise RuntimeError(f"{name}: training failed ({'; '.join(str(e) for e in errors if e)}); models not written: {missing}")
    return paths


def share_out(todo: list[dict], runs: int) -> list[list[dict]]:
    """The requests split into up to `runs` shares, one per run, dealt in turn. A request that starts from
    another in this call's requests (its "init") joins that one's share, after it."""
    shares: list[list[dict]] = [[] for _ in range(max(1, min(runs, len(todo))))]
    share_of, dealt = {}, 0
    for request in todo:
        if request["init"] in share_of:
            index = share_of[request["init"]]
        else:
            index, dealt = dealt % len(shares), dealt + 1
        share_of[request["out_path"]] = index
        shares[index].append(request)
    return [share for share in shares if share]


def _fit(loop, todo: list[dict], shared: dict, scaling, cpus: int, storage: str, name: str, max_failures: int):
    """One `TorchTrainer` run of `todo`; its finished models saved into their out_paths. Returns its error."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker_main, train_loop_config={"loop": loop, "requests": todo, "shared": shared},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"{name}-{settings_digest([r['settings'] for r in todo])}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))  # each finished model is one
    result = trainer.fit()
    save_finished(result, todo)
    return result.error


def save_finished(result, todo: list[dict]) -> None:
    """On the driver: every finished model of a run's checkpoints that a request asked for, into its out_path."""
    wanted = [_key(r) for r in todo]
    for checkpoint, _ in result.best_checkpoints or []:
        with checkpoint.as_directory() as folder:
            manifest = json.loads((Path(folder) / MANIFEST).read_text())
            model = manifest["model"]
            if model in wanted:
                sidecar = json.loads((Path(folder) / "model.json").read_text())
                save_model(model["out_path"], load_file(str(Path(folder) / "model.safetensors")), sidecar)


def _worker_main(config: dict) -> None:
    # Ray Train logs every report, checkpoint and device move at INFO, some of it through a logger named by
    # its file path (under the root logger): bookkeeping, not progress. Our loops print their own progress.
    for name in ("", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    worker = Worker(config)
    try:
        config["loop"](worker)
    finally:
        shutil.rmtree(worker._scratch, ignore_errors=True)


class Worker:
    """What a training loop sees on one Ray Train worker: its rank and device, the shared inputs, the
    requests still to train, and the two ways its results leave the node (`report`, `finish`)."""

    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.requests = config["requests"]
        self.shared = {key: ray.get(ref) for key, ref in config["shared"].items()}
        self.starts = dict(self.shared.pop("saved_starts"))  # out_path -> trainable state a request starts from
        self.finished, self._progress = [], None
        self._scratch = Path(tempfile.mkdtemp(prefix="distmeta-train-"))
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # a restarted worker group, or a rerun of the same run
            self._restore(checkpoint)

    def _restore(self, checkpoint) -> None:
        folder = self._scratch / "restored"
        checkpoint.to_directory(str(folder))
        manifest = json.loads((folder / MANIFEST).read_text())
        keys = [_key(r) for r in self.requests]
        self.finished = [k for k in manifest["finished"] if k in keys]
        for kept in manifest["kept"]:
            if kept["key"] in keys:
                self.starts[kept["key"]["out_path"]] = load_file(str(folder / kept["file"]))
        if manifest["progress"] in keys:
            self._progress = (manifest["progress"], folder / "progress")

    def pending(self):
        """(number, request) of every request not finished yet, in order (numbers count from 1 over all)."""
        for number, request in enumerate(self.requests, 1):
            if _key(request) not in self.finished:
                yield number, request

    def start_state(self, request: dict) -> dict | None:
        """The trainable state `request` starts from (its "init" model's), or None."""
        return self.starts[request["init"]] if request["init"] else None

    def resume_folder(self, request: dict) -> Path | None:
        """What the last progress checkpoint of an interrupted `request` saved (`report(progress=...)`), or None."""
        return self._progress[1] if self._progress and self._progress[0] == _key(request) else None

    def report(self, metrics: dict, request: dict | None = None, progress=None) -> None:
        """Metrics (every rank calls this the same number of times); on rank 0 with `progress(folder)`, also
        a checkpoint holding what `progress` writes into folder, to resume `request` from."""
        self._report(metrics, progress=(request, progress) if progress else None)

    def finish(self, request: dict, state: dict[str, torch.Tensor], sidecar: dict, metrics: dict | None = None) -> None:
        """`request`'s model is trained: rank 0's state and sidecar leave in a checkpoint the driver saves."""
        self.finished.append(_key(request))
        self._progress = None
        if any(r["init"] == request["out_path"] for r in self.requests):
            self.starts[request["out_path"]] = {k: v.detach().cpu() for k, v in state.items()}
        self._report({**(metrics or {}), "finished": request["out_path"]}, model=(request, state, sidecar))

    def _report(self, metrics: dict, model=None, progress=None) -> None:
        import ray.train

        if self.rank != 0 or (model is None and progress is None):  # only rank 0 has anything to checkpoint
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(dir=self._scratch))
        try:
            manifest = {"finished": self.finished, "kept": [], "model": None, "progress": None}
            for request in self.requests:  # the in-run models that unfinished requests start from travel along
                needed = any(r["init"] == request["out_path"] and _key(r) not in self.finished for r in self.requests)
                if needed and request["out_path"] in self.starts:
                    file = f"kept-{len(manifest['kept'])}.safetensors"
                    save_file(self.starts[request["out_path"]], str(folder / file))
                    manifest["kept"].append({"key": _key(request), "file": file})
            if model:
                request, state, sidecar = model
                save_model(folder / "model.safetensors", state, sidecar)  # its sidecar: model.json
                manifest["model"] = _key(request)
            if progress:
                request, write = progress
                (folder / "progress").mkdir()
                write(folder / "progress")
                manifest["progress"] = _key(request)
            write_json(folder / MANIFEST, manifest)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
