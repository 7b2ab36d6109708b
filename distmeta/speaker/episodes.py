"""Speaker ICL episodes: a target utterance and k enrollment pairs of the same speaker, drawn for
training or reproducibly for evaluation; one row per prediction and UA_spk.

    episode  = one target utterance of a speaker + k of the same speaker's other utterances with their labels
    UA_spk   = mean over speakers of each speaker's accuracy (with its std, median, max and min)
"""

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from distmeta.data.speakers import SpeakerTask, sample_enrollment


# Stage-2 enrollment of the paper's Table IV rows: (sampling setting, fewest shots, most shots, only this emotion).
# "stage1" is the first stage (no pairs); "Neutral1" trains the 1-shot_N speech LM of Table II (always one neutral pair).
TRAINING_SETTINGS = {"stage1": ("TU+LU", 0, 0, None), "TU+LU": ("TU+LU", 0, 7, None), "TO+LD": ("TO+LD", 7, 7, None),
                     "Neutral": ("TU+LO", 0, 7, "neutral"), "Neutral1": ("TU+LO", 1, 1, "neutral")}


@dataclass
class Episode:
    task: SpeakerTask
    target: int
    shots: list[int]

    @property
    def utterances(self) -> list[str]:
        """Reading order of the prompt: the enrollment utterances, then the target."""
        return [self.task.utterances[i] for i in self.shots] + [self.task.utterances[self.target]]


def stage_enrollment(training: str, emotions, max_shots: int) -> tuple[str, tuple[int, int], int | None]:
    """(sampling setting, shot range, emotion index) of a training setting; shot counts capped at the
    model's max_shots and, for LD, at the number of emotions."""
    if training not in TRAINING_SETTINGS:
        raise ValueError(f"training setting must be one of {list(TRAINING_SETTINGS)}, got {training!r}")
    setting, low, high, emotion = TRAINING_SETTINGS[training]
    cap = min(max_shots, len(emotions)) if setting.endswith("LD") else max_shots
    return setting, (min(low, cap), min(high, cap)), (list(emotions).index(emotion) if emotion is not None else None)


def random_episodes(tasks: list[SpeakerTask], n: int, setting: str, shots: tuple[int, int], rng: np.random.Generator,
                    emotion: int | None = None) -> list[Episode]:
    """n episodes: a random speaker's random utterance as target, k uniform in shots, enrollment under `setting`."""
    if not tasks:
        raise ValueError("no speakers to draw episodes from (an empty train or validation split?)")
    episodes = []
    while len(episodes) < n:
        task = tasks[int(rng.integers(len(tasks)))]
        target = int(rng.integers(len(task.utterances)))
        k = int(rng.integers(shots[0], shots[1] + 1))
        try:
            episodes.append(Episode(task, target, sample_enrollment(task, target, k, setting, rng, emotion)))
        except ValueError:
            continue  # this speaker cannot supply k pairs for this target (e.g. too few items): draw again
    return episodes


def table2_conditions(n_emotions: int) -> list[tuple[str, int]]:
    """Table II's (test setting, k): no pairs, TU+LD with 1..E-1 pairs, TO+LD with E (every emotion once)."""
    return [("", 0)] + [("TU+LD", k) for k in range(1, n_emotions)] + [("TO+LD", n_emotions)]


def evaluation_episodes(tasks: list[SpeakerTask], k: int, setting: str, seed: int, emotion: int | None = None) -> list[Episode]:
    """Every utterance of every speaker as a target once, with k enrollment pairs drawn reproducibly.

    The draw depends on (seed, speaker, target, k, setting) only, so every model sees the same prompts.
    Raises ValueError (naming the speaker) when some target cannot get k pairs under `setting`.
    """
    episodes = []
    for task in tasks:
        for target in range(len(task.utterances)):
            key = zlib.crc32(f"{seed}/{task.speaker}/{target}/{k}/{setting}/{emotion}".encode())
            episodes.append(Episode(task, target, sample_enrollment(task, target, k, setting, np.random.default_rng(key), emotion)))
    return episodes


def episode_prompts(model, episodes: list[Episode], words: list[str], device="cpu") -> dict:
    """`model`'s (a SpeechLM's) batch of the episodes' prompts and target labels; their speech is
    `[u for e in episodes for u in e.utterances]`, in reading order."""
    prompts = [model.prompt([words[e.task.labels[i]] for i in e.shots]) for e in episodes]
    batch = model.collate(prompts, [words[e.task.labels[e.target]] for e in episodes])
    return {k: v.to(device) for k, v in batch.items()}


def episode_batch(model, bank, episodes: list[Episode], words: list[str], device="cpu") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(batch, frames, frame_mask) for `model` (a SpeechLM): prompts, target labels and the speech in reading order."""
    speech = bank.batch([u for e in episodes for u in e.utterances])
    return episode_prompts(model, episodes, words, device), speech["frames"].to(device), speech["frame_mask"].to(device)


def result_rows(episodes: list[Episode], predictions: list[str], words: list[str], **columns) -> pd.DataFrame:
    """One row per episode: speaker, utterance, k, label, prediction, correct (+ `columns`, e.g. model and setting)."""
    return pd.DataFrame([{**columns, "speaker": e.task.speaker, "utterance": e.task.utterances[e.target], "k": len(e.shots),
                          "label": words[e.task.labels[e.target]], "prediction": p,
                          "correct": p == words[e.task.labels[e.target]]} for e, p in zip(episodes, predictions)])


def speaker_accuracies(correct: pd.Series, speakers: pd.Series) -> pd.Series:
    """Each speaker's accuracy, indexed by speaker."""
    return correct.astype(float).groupby(speakers.to_numpy()).mean()


def ua_spk(correct: pd.Series, speakers: pd.Series) -> dict:
    """UA_spk (mean of per-speaker accuracies) and the std (population), median, max and min of those accuracies."""
    per_speaker = speaker_accuracies(correct, speakers)
    return {"UA_spk": per_speaker.mean(), "std": per_speaker.std(ddof=0), "median": per_speaker.median(),
            "max": per_speaker.max(), "min": per_speaker.min(), "speakers": len(per_speaker)}
