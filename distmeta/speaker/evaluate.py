"""k-shot inference of a trained speech LM on the test speakers, under every condition its tables need.

    predict  = argmax over the closed set of label words of log P(word | instruction, pairs, target)
"""

from dataclasses import dataclass

import pandas as pd
import torch

from distmeta.report import Progress
from distmeta.speaker.episodes import Episode, episode_prompts, evaluation_episodes, result_rows, ua_spk


@torch.no_grad()
def predict(model, bank, episodes: list[Episode], words: list[str], batch_size: int = 64, generate: bool = False,
            device="cpu") -> list[str]:
    """The predicted label word of every episode: closed-set scoring, or free generation (beam 4) with `generate`.

    Each utterance's speech queries are computed once: the episodes reuse a few hundred utterances as targets
    and pairs, and the Q-Former was ~40% of scoring a batch of 7-pair prompts."""
    model.eval()
    utterances = list(dict.fromkeys(u for e in episodes for u in e.utterances))
    queries = {}
    for start in range(0, len(utterances), batch_size):
        chunk = utterances[start:start + batch_size]
        speech = bank.batch(chunk)
        queries.update(zip(chunk, model.speech_queries(speech["frames"].to(device), speech["frame_mask"].to(device))))
    out = []
    for start in range(0, len(episodes), batch_size):
        chunk = episodes[start:start + batch_size]
        batch = episode_prompts(model, chunk, words, device)
        speech = torch.stack([queries[u] for e in chunk for u in e.utterances])
        if generate:
            out.extend(model.generate(batch, None, None, queries=speech))
        else:
            out.extend(words[i] for i in model.score(batch, None, None, queries=speech).argmax(-1).tolist())
    return out


@dataclass
class EvaluationConfig:
    max_lo_shots: int = 3  # TU+LO columns of Table III / IV (the paper: 1..4, with 50 utterances per emotion; ours: 4)
    seed: int = 0  # enrollment draws (every model sees the same prompts)
    generate: bool = False  # free generation (beam 4, exact match) instead of closed-set scoring
    batch_size: int = 64


def conditions(training: str, n_emotions: int, max_shots: int, config: EvaluationConfig) -> list[tuple]:
    """(test setting, emotion, k) to evaluate a speech LM of `training` on.

    The main model (TU+LU): Table II (0-shot; TU+LD with 1..E-1 pairs; TO+LD with E, i.e. every emotion once)
    and Table III (TU+LD, TU+LU, TE+LD, TE+LU with 1..E-1 pairs; TU+LO of each emotion with 1..max_lo_shots).
    Table IV's models: TU+LD / TO+LD as in Table II and neutral TU+LO. stage1: 0-shot; Neutral1: one neutral pair.
    """
    top = min(max_shots, n_emotions)
    ld = [("TU+LD", "", k) for k in range(1, top)] + ([("TO+LD", "", top)] if top == n_emotions else [])
    lo = lambda emotions: [("TU+LO", e, k) for e in emotions for k in range(1, min(config.max_lo_shots, max_shots) + 1)]
    if training == "stage1":
        return [("", "", 0)]
    if training == "Neutral1":
        return [("TU+LO", "neutral", 1)]
    if training == "TU+LU":
        table3 = [(s, "", k) for s in ("TU+LU", "TE+LD", "TE+LU") for k in range(1, min(max_shots, n_emotions - 1) + 1)]
        return [("", "", 0)] + ld + table3 + lo(["*"])
    return ld + lo(["neutral"])


MODEL_NAMES = {"stage1": "0-shot", "Neutral1": "1-shot_N", "TU+LU": "Proposed", "TO+LD": "Proposed (TO+LD_7)",
               "Neutral": "Proposed (Neutral_0:7)"}


def evaluate_speech_lm(model, bank, data, training: str, config: EvaluationConfig, log=print) -> pd.DataFrame:
    """Every condition of `training`'s model on the test speakers; a condition some speaker cannot supply is skipped."""
    parts = []
    todo = conditions(training, len(data.emotions), model.config.max_shots, config)
    todo = [(s, e, k) for s, e0, k in todo for e in (data.emotions if e0 == "*" else [e0])]
    progress = Progress(f"{MODEL_NAMES[training]} condition", len(todo), log)
    for number, (setting, emotion, k) in enumerate(todo, 1):
        index = list(data.emotions).index(emotion) if emotion else None
        try:
            episodes = evaluation_episodes(data.splits["test"], k, setting or "TU+LU", config.seed, index)
        except ValueError as err:
            log(f"{MODEL_NAMES[training]}: skipping {setting} {emotion} k={k}: {err}")
            continue
        predictions = predict(model, bank, episodes, data.words, config.batch_size, config.generate)
        parts.append(result_rows(episodes, predictions, data.words, model=MODEL_NAMES[training], training=training,
                                  setting=setting, emotion=emotion))
        stats = ua_spk(parts[-1]["correct"], parts[-1]["speaker"])
        progress.update(number, f"{setting or '-'} {emotion} k={k}, UA_spk {stats['UA_spk']:.3f}")
    return pd.concat(parts, ignore_index=True)
