"""Meta-PerSER meta-training (paper 2.3): the SER meta-model, its inputs, one split's training, the cache.

    meta = build_meta_model(upstream_config, ssl_e_path, config)   # a meta.maml.MetaModel: SSL-E + its LSLR rates
    result = meta_train_split(corpus, split, upstream_config, ssl_e_path, config)           # serially in process
    result = meta_train_split(..., actors=ActorPool(ActorConfig()))                           # on Ray task actors
    state = meta_train_cached(path, corpus, split, upstream_config, ssl_e_path, config, data)  # saved, reused

The meta-learning itself (MetaConfig, MetaLearner, the outer loop, checkpoints, the task actors) is
`distmeta.meta`, shared with the speaker path; this module builds what is the listener's: an SER model from
SSL-E (INI) or the untrained upstream, scoped by `meta.scope`, its pooled-feature or audio bank, and the
replica a task actor builds. Meta-test (`test_adapt`, `test_rate_steps`) is `distmeta.listener.metatest`.
"""

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from distmeta.features import inputs_for, pooled_for
from distmeta.meta.actors import task_gradients
from distmeta.meta.learner import SEEDED, MetaConfig, MetaLearner, train
from distmeta.meta.maml import MetaModel
from distmeta.models.ser import SERModel, set_scope
from distmeta.models.upstream import Upstream, build_name, landed, portable
from distmeta.training.artifacts import is_done, save_model


def build_meta_model(upstream_config, ssl_e, config: MetaConfig) -> MetaModel:
    """The meta-model meta-training starts from: SSL-E (INI; `ssl_e` its file or its state dict) or the
    untrained upstream with a fresh head, with every trainable parameter's rates at `inner_lr`."""
    with SEEDED:
        torch.manual_seed(config.seed)
        model = SERModel(Upstream(upstream_config))
    if config.ini:
        model.load_state_dict(ssl_e if isinstance(ssl_e, dict) else load_file(str(ssl_e)))
    return meta_model_of(model, config)


def meta_model_of(model, config: MetaConfig) -> MetaModel:
    """`model` scoped by `config.scope`, with fresh rates; they train only with LSLR."""
    meta = MetaModel(set_scope(model, config.scope), config.inner_steps, config.inner_lr)
    meta.rates.requires_grad_(config.lslr)
    return meta


def make_bank(meta: MetaModel, corpus, utterances, config: MetaConfig, max_seconds, inputs=None, test: bool = False):
    """What the meta-model reads for `utterances`: its input bank (scope entire, or with `test` the bank
    meta-test and enrollment adapt on when the whole model fine-tunes) or its pooled features;
    `inputs`: a job-wide input bank to take them from (see features.inputs_for)."""
    upstream = meta.model.upstream
    if config.scope == "entire" or (test and config.test_adapt == "finetune"):
        return inputs_for(upstream, utterances, inputs, corpus, max_seconds)
    return pooled_for(upstream, utterances, inputs, corpus, max_seconds)


def training_pool(tasks: list, val_task) -> list[str]:
    """Every utterance meta-training reads for a split: its training annotators' and its validation annotator's."""
    return sorted({u for t in tasks for u in t.utterances} | set(val_task.utterances))


class ListenerReplica:
    """How a task actor builds the SER meta-model: the upstream from the driver's checkpoint bytes (`shared`,
    so the node need not see the driver's disk), once per actor; each training re-scopes it."""

    def __init__(self, upstream_config):
        self.upstream_config = upstream_config
        self.key = repr(upstream_config)

    def shared(self):
        return portable(self.upstream_config)

    def model(self, config, shared):
        return build_meta_model(landed(self.upstream_config, shared), None, replace(config, ini=False)).model

    def meta_model(self, model, config):
        return meta_model_of(model, config)  # this training's scope, rates and LSLR


def meta_train_split(corpus, split, upstream_config, ssl_e, config: MetaConfig, max_seconds=None, log=print,
                     actors=None, on_step=None, inputs=None, **checkpointing) -> dict:
    """Meta-train Meta-PerSER for one split of the rotation: serially in process, or on `actors`
    (a `distmeta.meta.actors.ActorPool`: Ray task actors holding the training annotators)."""
    meta = build_meta_model(upstream_config, ssl_e, config)
    tasks, val_task = split.train_tasks(corpus), split.val_task(corpus)
    bank = make_bank(meta, corpus, training_pool(tasks, val_task), config, max_seconds, inputs)
    learner = MetaLearner(meta, config)
    gradients = task_gradients(actors, ListenerReplica(upstream_config), meta, config, tasks, bank)
    return train(learner, gradients, len(tasks), bank, val_task, log=log, on_step=on_step, **checkpointing)


# Table 2: the components added one by one (paper section 4.3).
ABLATIONS = {
    "none": dict(ini=False, csmt=False, da=False, lslr=False),
    "INI": dict(ini=True, csmt=False, da=False, lslr=False),
    "INI+CSMT": dict(ini=True, csmt=True, da=False, lslr=False),
    "INI+DA": dict(ini=True, csmt=False, da=True, lslr=False),
    "INI+LSLR": dict(ini=True, csmt=False, da=False, lslr=True),
    "INI+CSMT+DA+LSLR": dict(ini=True, csmt=True, da=True, lslr=True),
}


def meta_train_cached(path, corpus, split, upstream_config, ssl_e_path, config: MetaConfig, data_settings: dict,
                      max_seconds=None, log=print, **training) -> dict:
    """meta_train_split (`training`: its actors, checkpointing and on_step), saved to `path`
    (safetensors + JSON sidecar): the MetaModel's state dict. Reused when the settings match."""
    path, ssl_e = Path(path), None if ssl_e_path is None else str(ssl_e_path)
    # The SSL-E it starts from counts by what shaped that model (its own settings), not by its file name.
    if ssl_e is not None and Path(ssl_e).with_suffix(".json").is_file():
        ssl_e = json.loads(Path(ssl_e).with_suffix(".json").read_text())["settings"]
    # "saved": what the file holds (a maml.MetaModel state dict), so files of an older layout are retrained
    settings = json.loads(json.dumps({"saved": "MetaModel", "meta": asdict(config), "split": asdict(split), "upstream": asdict(upstream_config), "upstream_build": build_name(upstream_config),
                                      "data": data_settings, "corpus": corpus.fingerprint(), "ssl_e": ssl_e}))
    if is_done(path, settings):
        return load_file(str(path))
    result = meta_train_split(corpus, split, upstream_config, ssl_e_path, config, max_seconds, log, settings=settings,
                              **training)
    save_model(path, result["best_state"], {"settings": settings, "best_step": result["best_step"],
                                            "best_val_loss": result["best_val_loss"], "history": result["history"],
                                            "max_seconds": max_seconds})  # what enrollment reads audio with
    return result["best_state"]


def meta_variants(meta: MetaConfig, methods, table2, scenario: str) -> dict:
    """{method name: MetaConfig}: Meta-PerSER itself (when among `methods`), plus the `table2` variants on
    unseen data."""
    variants = {"Meta-PerSER": meta} if "Meta-PerSER" in methods else {}
    if scenario == "unseen":
        for name in table2:
            if name not in ABLATIONS:
                raise SystemExit(f"protocol.table2: unknown variant {name!r}; choose from {list(ABLATIONS)}")
            variants[f"Meta[{name}]"] = MetaConfig(**{**asdict(meta), **ABLATIONS[name]})
    return variants


def meta_model_path(models_dir, scenario: str, test_annotator: str, meta: MetaConfig) -> Path:
    """Where a split's meta-trained model is saved: named by its scenario, test annotator and components."""
    tag = "-".join(f"{k}{int(getattr(meta, k))}" for k in ("ini", "csmt", "da", "lslr"))
    return Path(models_dir) / scenario / test_annotator / f"meta-{tag}.safetensors"
