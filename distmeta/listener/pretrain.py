"""Pretraining before few-shot adaptation, as a Ray Train `TorchTrainer` job.

kind      what trains                                          on what
ssl_e     the whole SER model (SSL-E, paper 2.3.1)            training annotators' vote distributions
linear    layer weights + classifier, upstream frozen         the same aggregated targets (Linear-Few)
multi     one head per training annotator, upstream frozen    each annotator's own labels (Multi-Few)

A tenth of the training utterances (by utterance, never by row) is held out
for validation; the saved state is the epoch with the lowest validation
class-balanced loss. Locally it is one CPU worker; `num_workers`/`use_gpu`
scale it out (each worker takes its share of every epoch's batches; gradients
are averaged by DDP).

The run goes through `training.launcher` (the one Ray Train launcher): the
workers get audio, rows and the upstream from the driver through Ray, their
models come back as checkpoints in Ray's storage, and only the driver writes
`models_dir`. Library code never starts Ray: the job calls `ray.init` first.
"""

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from distmeta.data.scenarios import Split
from distmeta.data.sources import DataConfig, load_corpus
from distmeta.features import AudioBank, ConvFeatureBank, PooledBank, input_bank, inputs_for
from distmeta.labels import CLASSES
from distmeta.models.ser import SERHead, SERModel, set_scope
from distmeta.models.upstream import Upstream, UpstreamConfig, build_name, landed, portable
from distmeta.report import say
from distmeta.training.artifacts import is_done, shaping
from distmeta.training.fit import TrainConfig, fit
from distmeta.training.launcher import RayTrainScaling, storage_path, train_many

Kind = Literal["ssl_e", "linear", "multi"]


@dataclass
class PretrainConfig(TrainConfig, RayTrainScaling):
    epochs: int = 4  # SSL-E, Linear and Multi on the tiny upstream; `--preset paper` sizes them for WavLM Base
    lr: float = 2e-3
    val_fraction: float = 0.1
    length_buckets: bool = False  # batches of utterances of similar length: less padding, so a faster SSL-E (training.fit)
    max_seconds: float = 12.0  # audio length cap
    # Ray Train runs side by side, each training its share of the models (training.launcher.train_many): two
    # one-CPU runs train the tiny upstream's models ~1.6x faster than one two-CPU run on 2 cores.
    parallel: int = 2


class MultiHeadSER(nn.Module):
    """Shared upstream, one SERHead per training annotator; inputs carry each row's head index in "task"."""

    def __init__(self, upstream: Upstream, num_heads: int):
        super().__init__()
        self.upstream = upstream
        self.heads = nn.ModuleList(SERHead(upstream.num_layers, upstream.dim) for _ in range(num_heads))

    def forward(self, inputs: dict) -> torch.Tensor:
        pooled = inputs["pooled"] if "pooled" in inputs else SERHead.pool(*self.upstream(inputs["wavs"], inputs["lengths"]))
        task = inputs["task"]
        logits = pooled.new_zeros(pooled.shape[1], self.heads[0].classifier.out_features)
        for h in task.unique().tolist():  # each row through its own annotator's head only
            rows = task == h
            logits[rows] = self.heads[h].logits_pooled(pooled[:, rows])
        return logits


def training_rows(corpus, split: Split, kind: Kind, val_fraction: float, seed: int):
    """(utterance ids, targets, head index) for training and validation rows."""
    if kind == "multi":
        rows = [(u, t, h) for h, task in enumerate(split.train_tasks(corpus)) for u, t in zip(task.utterances, task.targets)]
    else:
        agg = split.aggregated_targets(corpus)
        rows = [(u, t, 0) for u, t in zip(agg.index, agg.to_numpy(np.float32))]
    utterances = sorted({u for u, _, _ in rows})
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(utterances, max(1, int(len(utterances) * val_fraction)), replace=False))
    parts = {}
    for name, keep in (("train", lambda u: u not in held_out), ("val", lambda u: u in held_out)):
        chosen = [r for r in rows if keep(r[0])]
        parts[name] = ([r[0] for r in chosen], np.stack([r[1] for r in chosen]).astype(np.float32),
                       torch.tensor([r[2] for r in chosen]))
    return parts


def build_model(kind: Kind, upstream_config: UpstreamConfig, num_heads: int = 1) -> nn.Module:
    upstream = Upstream(upstream_config)
    if kind == "multi":
        model = MultiHeadSER(upstream, num_heads)
        for p in model.upstream.parameters():
            p.requires_grad_(False)
        return model
    return set_scope(SERModel(upstream), "entire" if kind == "ssl_e" else "linear")


def _settings(kind: Kind, data: DataConfig, upstream: UpstreamConfig, split: Split, config: PretrainConfig,
              corpus: str) -> dict:
    """Everything that shapes a pretrained model (`corpus`: the corpus's fingerprint, audio included)."""
    return json.loads(json.dumps({"kind": kind, "data": asdict(data), "corpus": corpus, "upstream": asdict(upstream), "upstream_build": build_name(upstream),
                                  "split": asdict(split), "pretrain": shaping(config)}))


def _train_loop(worker) -> None:
    """Runs on every Ray Train worker (a `training.launcher.Worker`): trains each pending request in turn."""
    import ray.train.torch

    given = worker.shared["inputs"]  # the driver's input bank (conv features) or the audio
    inputs = {}  # per upstream: its frozen conv encoder's outputs (or the audio), computed once
    frozen_pooled = None  # pooled features of the untrained upstream, shared by every linear/multi model
    for number, request in worker.pending():
        settings, parts = request["settings"], request["rows"]
        config, kind = PretrainConfig(**settings["pretrain"]), settings["kind"]
        torch.manual_seed(config.seed)
        upstream_key = json.dumps(settings["upstream"], sort_keys=True)
        upstream = landed(UpstreamConfig(**settings["upstream"]), worker.shared["upstreams"][upstream_key])
        model = build_model(kind, upstream, len(settings["split"]["train_annotators"]))
        if upstream_key not in inputs:  # the driver's conv features (refused if another encoder's), else computed here
            inputs[upstream_key] = (inputs_for(model.upstream, given.items, given) if isinstance(given, ConvFeatureBank)
                                    else input_bank(model.upstream, given))
        if kind != "ssl_e" and frozen_pooled is None:
            frozen_pooled = PooledBank(model.upstream, inputs[upstream_key])
        bank = inputs[upstream_key] if kind == "ssl_e" else frozen_pooled
        model = ray.train.torch.prepare_model(model)  # DDP when world > 1, device placement
        name = f"{kind} {settings['split']['scenario']} test={settings['split']['test_annotator']}"
        if worker.rank == 0:
            print(f"[{number}/{len(worker.requests)}] pretraining {name}: {len(parts['train'][0])} rows", flush=True)

        def lengths(part):
            return [bank.length(u) for u in parts[part][0]] if config.length_buckets else None

        def batches_of(part):
            ids, _, heads = parts[part]

            def make(idx):
                batch = {k: v.to(worker.device) for k, v in bank.batch([ids[i] for i in idx]).items()}
                batch["task"] = heads[idx].to(worker.device)
                return batch
            return make

        def report(epoch, metrics, is_best, state, name=name, number=number):
            worker.report({**metrics, "model": name, "model_index": number})

        result = fit(model, batches_of("train"), parts["train"][1], parts["val"][1], batches_of("val"),
                     **config.fit_settings(), rank=worker.rank, world_size=worker.world, on_epoch=report,
                     log=functools.partial(say, name) if worker.rank == 0 else None,
                     lengths=lengths("train"), val_lengths=lengths("val"))
        state = {k.removeprefix("module."): v for k, v in result["best_state"].items()}
        best = result["history"][result["best_epoch"] - 1]
        worker.finish(request, state, {"settings": settings, "best": best, "classes": list(CLASSES)})


def pretrain_many(requests, storage: str, name: str = "pretrain", max_failures: int = 2, inputs=None) -> list[Path]:
    """Train every (kind, data, upstream, split, config, out_path) request in Ray Train runs
    (`training.launcher`: `storage` is Ray's storage, a shared folder or URI on a cluster).

    Models already saved with the same settings are skipped, so a rerun, or a
    worker restarted after a failure, picks up where it stopped. Saved files are
    safetensors with a JSON sidecar (settings, best epoch and losses). The workers
    get the audio (or `inputs`, the job's input bank of the whole corpus: conv
    features they need not compute again), their training rows and the upstream's
    checkpoint from the driver through the object store: they need nothing on
    their node's disk.
    """
    corpora = [json.dumps(asdict(r[1]), sort_keys=True) for r in requests]
    data_of = dict(zip(corpora, (r[1] for r in requests)))
    corpus_of = {key: load_corpus(data, progress=False) for key, data in data_of.items()}
    # per corpus: a model trained on other audio or labels is never reused
    todo = [{"settings": _settings(*r[:5], corpus_of[key].fingerprint()), "out_path": r[5]} for key, r in zip(corpora, requests)]
    pending = [(t, r) for t, r in zip(todo, requests) if not is_done(t["out_path"], t["settings"])]
    if not pending:
        return [Path(t["out_path"]) for t in todo]
    if len({json.dumps([t["settings"]["data"], t["settings"]["pretrain"]]) for t, _ in pending}) != 1:
        raise ValueError("one pretrain_many call trains models of one corpus and one PretrainConfig")
    config, corpus = requests[0][4], corpus_of[corpora[0]]  # the scaling settings are not in the models' settings
    for t, r in pending:
        t["rows"] = training_rows(corpus, r[3], t["settings"]["kind"], config.val_fraction, config.seed)
    upstreams = {json.dumps(t["settings"]["upstream"], sort_keys=True): r[2] for t, r in pending}
    shared = {"inputs": inputs if inputs is not None else AudioBank(corpus, corpus.utterances.index, config.max_seconds),
              "upstreams": {key: portable(upstream) for key, upstream in upstreams.items()}}
    return train_many(_train_loop, todo, shared, config, storage, name, max_failures)


def load_pretrained(kind: Kind, upstream: UpstreamConfig, path, num_heads: int = 1) -> nn.Module:
    model = build_model(kind, upstream, num_heads)
    model.load_state_dict(load_file(str(path)))
    return model


KIND_OF_METHOD = {"Entire-Zero": "ssl_e", "Entire-Few": "ssl_e", "Entire-Sim": "ssl_e", "Entire-All": "ssl_e", "Linear-Few": "linear", "Multi-Few": "multi"}


def kinds_for(methods, table2) -> list[str]:
    """The pretrained kinds a meta-test of `methods` (and Table 2's variants `table2`) needs."""
    kinds = sorted({KIND_OF_METHOD[m] for m in methods if m in KIND_OF_METHOD}
                   | ({"ssl_e"} if "Meta-PerSER" in methods or table2 else set()))
    if "multi" in kinds and "linear" not in kinds:
        kinds.append("linear")  # Multi-Few adapts on the Linear model's frozen-upstream features
    return kinds


def pretrain_rotation(kinds, data: DataConfig, upstream: UpstreamConfig, config: PretrainConfig, splits: dict,
                      models_dir, storage: str = "", inputs=None) -> dict:
    """Pretrain `kinds` for every split of every scenario in one Ray Train run.

    Returns {(scenario, test annotator): {kind: path}}; models live under
    models_dir/<scenario>/<test annotator>/<kind>.safetensors. `storage`: Ray's
    storage (a folder every node sees, or a URI; "": models_dir/ray, one node). `inputs`: the job's input bank
    of the corpus (see pretrain_many), or None.
    """
    checkpoints, requests = {}, []
    for scenario, scenario_splits in splits.items():
        for split in scenario_splits:
            for kind in kinds:
                path = Path(models_dir) / scenario / split.test_annotator / f"{kind}.safetensors"
                checkpoints.setdefault((scenario, split.test_annotator), {})[kind] = path
                requests.append((kind, data, upstream, split, config, path))
    if requests:
        pretrain_many(requests, storage_path(storage, Path(models_dir) / "ray"), name="pretrain", inputs=inputs)
    return checkpoints
