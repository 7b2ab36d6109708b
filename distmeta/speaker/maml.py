"""MAML on speaker tasks: the meta-learning core's meta-learner and task actors (`distmeta.meta`), over speakers.

    meta, result = meta_train(bank, data, pretrained, config)                  # serial, in process
    meta, result = meta_train(bank, data, pretrained, config, actors=pool)     # one Ray task actor per speaker
    rows = evaluate(meta, bank, data, config, evaluation)                      # the MAML rows of Table II

So gradient-based and in-context personalization compare on one corpus, one metric and the same enrollment
draws:
- a speaker is a `data.scenarios.Task` (its utterances, its emotions one-hot), so the core's
  `learner.task_meta_gradient`, `train` (outer loop, DA, LSLR, model selection) and
  `actors.ActorPool` apply unchanged, as on the listener path; only the replica an actor builds differs (`ClassifierReplica`);
- meta-training starts from the trained Pretrained classifier (attentive pooling + linear on the frozen
  speech encoder's frames, Table II) and adapts all of it: `shots` enrollment pairs per speaker in the
  inner loop, `shots` more as the outer batch (CSMT: the same pairs);
- model selection: the validation speakers' class-balanced query loss after adaptation, averaged;
- meta-test: each test utterance is predicted after `test_steps` inner steps, with the learned rates, on
  its k enrollment pairs: exactly the pairs the speech LM reads in its prompt (`evaluation_episodes`,
  same seed), at k = 0 (no adaptation), TU+LD 1..E-1 and TO+LD E, Table II's conditions.
"""

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from distmeta.data.scenarios import Task
from distmeta.meta.actors import ActorConfig, task_gradients
from distmeta.meta.learner import MetaConfig, MetaLearner, train
from distmeta.meta.maml import MetaModel
from distmeta.models.speaker_classifier import SpeakerClassifier
from distmeta.report import Progress
from distmeta.speaker.episodes import evaluation_episodes, result_rows, table2_conditions, ua_spk


def _speaker_meta_config() -> MetaConfig:
    # Sized for ~20-30 utterances per speaker: 7 support + 7 query pairs (7 = the speech LM's most pairs).
    # inner_lr: 0.1 and 0.01 overshoot on 1-7 pairs; 0.003 with 300 outer steps does not. CSMT (outer loss on
    # the same pairs) stops improving within a few outer steps.
    return MetaConfig(scope="entire", csmt=False, inner_lr=3e-3, inner_steps=5, outer_lr=1e-3, outer_steps=300,
                      shots=7, tasks_per_step=16, test_steps=5, val_steps=5, val_every=10, val_shots=7, val_seeds=2,
                      val_queries=14, select="loss", test_adapt="rates")  # Table II's MAML rows were measured so


@dataclass
class SpeakerMAMLConfig:
    enabled: bool = True  # the MAML rows of Table II
    distributed: bool = True  # on Ray task actors (each holds training speakers); false: the serial reference
    actors: ActorConfig = field(default_factory=lambda: ActorConfig(max_actors=8))  # 8 actors share the speakers
    meta: MetaConfig = field(default_factory=_speaker_meta_config)  # `scope` is unused: the classifier adapts whole


def as_task(speaker, n_emotions: int) -> Task:
    """A `data.speakers.SpeakerTask` as a meta-learning task: its utterances and one-hot emotions."""
    return Task(speaker.speaker, "speaker", speaker.utterances, np.eye(n_emotions, dtype=np.float32)[speaker.labels])


def speaker_meta_model(model: SpeakerClassifier, config: MetaConfig) -> MetaModel:
    """The classifier with fresh per-step rates for every parameter; they train only with LSLR."""
    meta = MetaModel(model, config.inner_steps, config.inner_lr)
    meta.rates.requires_grad_(config.lslr)
    return meta


class ClassifierReplica:
    """How a task actor builds its replica: a speaker classifier over `dim`-dimensional frames (nothing shared)."""

    def __init__(self, dim: int, n_emotions: int):
        self.dim, self.n_emotions = dim, n_emotions
        self.key = f"SpeakerClassifier({dim}, {n_emotions})"

    def shared(self):
        return None

    def model(self, config, shared):
        return SpeakerClassifier(self.dim, self.n_emotions)

    def meta_model(self, model, config):
        return speaker_meta_model(model, config)


def meta_train(bank, data, pretrained: SpeakerClassifier, config: MetaConfig, actors=None, log=print) -> tuple[MetaModel, dict]:
    """Meta-train on the training speakers from `pretrained` (with `config.ini`; else a fresh classifier);
    returns the meta-model at its best validation step and `meta.learner.train`'s result."""
    n = len(data.emotions)
    torch.manual_seed(config.seed)
    start = copy.deepcopy(pretrained) if config.ini else SpeakerClassifier(bank.dim, n)
    meta = speaker_meta_model(start.train(), config)
    tasks = [as_task(s, n) for s in data.splits["train"]]
    val_tasks = [as_task(s, n) for s in data.splits["valid"]]
    learner = MetaLearner(meta, config)
    gradients = task_gradients(actors, ClassifierReplica(bank.dim, n), meta, config, tasks, bank)
    result = train(learner, gradients, len(tasks), bank, val_tasks, log=log)
    meta.load_state_dict(result["best_state"])
    return meta, result


def predict(meta: MetaModel, bank, episodes, n_emotions: int, steps: int) -> list[int]:
    """Each episode's predicted emotion: adapt on its enrollment pairs (none: the meta-trained model), then
    classify its target."""
    if not any(e.shots for e in episodes):
        with torch.no_grad():
            return meta(bank.batch([e.task.utterances[e.target] for e in episodes])).argmax(-1).tolist()
    eye, out = np.eye(n_emotions, dtype=np.float32), []
    for e in episodes:
        fast = meta.adapt(bank.batch([e.task.utterances[i] for i in e.shots]), torch.as_tensor(eye[e.task.labels[e.shots]]),
                          steps)
        with torch.no_grad():
            out.append(int(meta(bank.batch([e.task.utterances[e.target]]), fast).argmax(-1)))
    return out


def evaluate(meta: MetaModel, bank, data, config: MetaConfig, seed: int, log=print) -> pd.DataFrame:
    """One row per test utterance and condition (model "MAML"), enrollment drawn as for the speech LM (`seed`)."""
    n, parts = len(data.emotions), []
    todo = table2_conditions(n)
    progress = Progress("MAML condition", len(todo), log)
    for number, (setting, k) in enumerate(todo, 1):
        episodes = evaluation_episodes(data.splits["test"], k, setting or "TU+LU", seed)
        predicted = predict(meta, bank, episodes, n, config.test_steps)
        parts.append(result_rows(episodes, [data.words[i] for i in predicted], data.words, model="MAML", training="MAML",
                                 setting=setting, emotion=""))
        progress.update(number, f"{setting or '-'} k={k}, UA_spk {ua_spk(parts[-1]['correct'], parts[-1]['speaker'])['UA_spk']:.3f}")
    return pd.concat(parts, ignore_index=True)
