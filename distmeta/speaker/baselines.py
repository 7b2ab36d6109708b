"""The classifier baselines of the ICL paper's Table II: Pretrained, Personalized_N and Personalized_A on
the same frozen frames as the speech LM, and Scratch: the speech encoder's own pretraining run
(`speaker.encoder`: log-mel -> the encoder's shape from random weights -> attentive pooling -> softmax,
trained on the training speakers' emotions), which was that baseline's recipe already.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from distmeta.data.speakers import SpeakerTask, sample_enrollment
from distmeta.models.speaker_classifier import SpeakerClassifier
from distmeta.speaker.encoder import load_encoder_ser, mel_batch, split_inputs
from distmeta.speaker.episodes import Episode, result_rows
from distmeta.training.fit import TrainConfig, fit


# name -> reference utterances: none / one neutral / one of each emotion
BASELINES = {"Pretrained": "none", "Personalized_N": "neutral", "Personalized_A": "all"}
CLASSIFIERS = ("Scratch", *BASELINES)  # Table II's classifier rows, in the paper's order


@dataclass
class ClassifierConfig(TrainConfig):
    """The classifier baselines train in the driver (`fit`), with TrainConfig's settings."""


def draw_references(task: SpeakerTask, target: int, references: str, emotions, rng: np.random.Generator) -> list[int]:
    """A baseline's reference utterances for one target (never the target itself): none, one neutral
    utterance, or one utterance of each emotion ordered by emotion (the classifier reads them in a fixed order)."""
    if references == "none":
        return []
    if references == "neutral":
        return sample_enrollment(task, target, 1, "TU+LO", rng, list(emotions).index("neutral"))
    return sorted(sample_enrollment(task, target, len(emotions), "TO+LD", rng), key=lambda i: task.labels[i])


def reference_episodes(tasks: list[SpeakerTask], references: str, emotions, rng: np.random.Generator) -> list[Episode]:
    """Every utterance of every speaker as a target, its references as `shots`."""
    return [Episode(task, target, draw_references(task, target, references, emotions, rng))
            for task in tasks for target in range(len(task.utterances))]


def classifier_inputs(bank, episodes: list[Episode]) -> dict:
    inputs = bank.batch([e.task.utterances[e.target] for e in episodes])
    if episodes[0].shots:
        refs = bank.batch([e.task.utterances[i] for e in episodes for i in e.shots])
        inputs.update(ref_frames=refs["frames"], ref_mask=refs["frame_mask"])
    return inputs


def train_classifier(name: str, bank, data, config: ClassifierConfig, log=print):
    """Train baseline `name` on the training speakers (model selection on the validation speakers' loss)."""
    references = BASELINES[name]
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n_refs = {"none": 0, "neutral": 1, "all": len(data.emotions)}[references]
    model = SpeakerClassifier(bank.dim, len(data.emotions), n_refs)
    train = reference_episodes(data.splits["train"], references, data.emotions, rng)
    val = reference_episodes(data.splits["valid"], references, data.emotions, np.random.default_rng(config.seed + 1))
    one_hot = lambda eps: np.eye(len(data.emotions), dtype=np.float32)[[e.task.labels[e.target] for e in eps]]

    def train_inputs(idx):  # fresh references every batch: the model must not memorise one pairing
        redrawn = [Episode(e.task, e.target, draw_references(e.task, e.target, references, data.emotions, rng))
                   for e in (train[i] for i in idx)]
        return classifier_inputs(bank, redrawn)

    result = fit(model, train_inputs, one_hot(train), one_hot(val), lambda idx: classifier_inputs(bank, [val[i] for i in idx]),
                 **config.fit_settings(), log=log)
    model.load_state_dict(result["best_state"])
    return model.eval(), result


def evaluate_classifier(name: str, model, bank, data, seed: int) -> pd.DataFrame:
    """Baseline `name`'s trained `model` on every test utterance (references drawn reproducibly from `seed`)."""
    episodes = reference_episodes(data.splits["test"], BASELINES[name], data.emotions, np.random.default_rng(seed))
    return _predicted_rows(name, episodes, data, lambda i, j: model(classifier_inputs(bank, episodes[i:j])))


def evaluate_scratch(encoder_path, corpus, data) -> pd.DataFrame:
    """Scratch on every test utterance: the speech encoder's pretraining model (encoder + its SER head)."""
    model = load_encoder_ser(encoder_path)
    episodes = reference_episodes(data.splits["test"], "none", data.emotions, np.random.default_rng(0))
    mels, _ = split_inputs(corpus, data.splits["test"], model.encoder.config.n_mels, len(data.emotions))  # episode order
    return _predicted_rows("Scratch", episodes, data, lambda i, j: model(mel_batch(mels[i:j])))


def _predicted_rows(name: str, episodes: list[Episode], data, logits_of, batch_size: int = 64) -> pd.DataFrame:
    """Result rows of model `name` on `episodes`; logits_of(i, j) -> the logits of episodes i..j-1."""
    with torch.no_grad():
        predicted = torch.cat([logits_of(i, i + batch_size).argmax(-1) for i in range(0, len(episodes), batch_size)])
    return result_rows(episodes, [data.words[i] for i in predicted.tolist()], data.words, model=name, training="",
                       setting="", emotion="")
