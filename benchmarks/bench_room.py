"""How much room a synthetic corpus leaves to personalize, in minutes instead of a default run.

    .venv/bin/python benchmarks/bench_room.py [--seeds 0,1,2] [--features evidence,voice,log-mel,tiny,tiny_pretrained] [--utterances 2000]

Calibrating the embedded corpus needs "is there room?" answered per
generator setting and corpus seed, and the default run takes most of an hour.
This answers it on the unseen scenario with the protocol's own episodes
(5 external test annotators x 3 seeds, K=32, Q=128), in three layers:

- oracle: the generator's ground truth, Oracle-Listener minus Oracle-Aggregate
  (the most any model could gain by knowing the listener);
- linear heads on frozen pooled features, the cheap analog of Entire-Zero
  (fit on the split's aggregated training labels), Entire-Few (50 steps on the
  support) and Entire-All (fit on the annotator's test pool minus the
  queries), for feature sets from ideal to real:
    evidence  what each utterance conveys (the generator's latent mix): a perfect upstream
    voice     the voice parameters each utterance was rendered with, relative to its speaker
              (F0, rate, level, tilt, voice quality...): a perfect speaker-normalising front end
    voice@S   the same, standardised, plus Gaussian noise of S standard deviations: a front end that
              reads them with that error (S=1 scores like tiny_pretrained)
    log-mel   mean and std of 40 log-mel bands: what plain spectra carry
    tiny      mean of each hidden layer of the tiny upstream, random weights (the tests' upstream)
    tiny_pretrained   the same, pretrained (training/tiny_wavlm.py; the listener jobs' upstream)
    wavlm_local:PATH  the same for any WavLM checkpoint in s3prl's format
    KIND+spk  any of these standardised within each speaker (speaker-level normalisation)
- the label shares behind the paper's Table A1 (neutral and frustration spread).

Room = All - Zero in maF1 points (the listener benchmark asks >= 6 for the real model).
When even `evidence` shows no room, the listeners are too alike; when only the
real features lack it, the upstream (or the audio) is what limits.
Numbers are from one run on one machine.
"""

import argparse
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torchaudio

from distmeta.listener.adapters import Oracle
from distmeta.data import make_synthetic_corpus, rotation
from distmeta.data.synthetic.listeners import EXTERNAL_BIAS, evidence, voice_parameters
from distmeta.features import AudioBank
from distmeta.metrics import class_balanced_cross_entropy, class_balanced_weights
from distmeta.models import Upstream, UpstreamConfig
from distmeta.listener.protocol import ProtocolConfig, run_episodes
from distmeta.training.tiny_wavlm import ready as build_upstream

K, Q, SEEDS = 32, 128, 3


def pooled_features(corpus, kind: str) -> pd.DataFrame:
    """One row of frozen features per utterance; `KIND+spk`: KIND standardised within each speaker (the
    speaker's mean and spread over all their utterances removed, as speaker-level normalisation in SER does)."""
    if kind.endswith("+spk"):
        table = pooled_features(corpus, kind[:-len("+spk")])
        by_speaker = table.groupby(corpus.utterances.loc[table.index, "speaker"])
        return (table - by_speaker.transform("mean")) / (by_speaker.transform("std") + 1e-6)
    utterances = corpus.utterances
    if kind == "evidence":
        conveyed = evidence(utterances)
        return pd.DataFrame(np.concatenate([conveyed, np.log(conveyed + 0.05)], 1), index=utterances.index)
    if kind == "voice":
        return voice_parameters(corpus)
    if kind.startswith("voice@"):
        table = voice_parameters(corpus)
        table = (table - table.mean()) / (table.std() + 1e-9)
        return table + np.random.default_rng(0).normal(0, float(kind[len("voice@"):]), table.shape)
    audio = AudioBank(corpus, utterances.index, 12.0)
    rows = []
    if kind == "log-mel":
        for u in utterances.index:
            mel = torchaudio.compliance.kaldi.fbank(audio.items[u][None] * 32768, num_mel_bins=40).T
            rows.append(torch.cat([mel.mean(1), mel.std(1)]).numpy())
    elif kind in ("tiny", "tiny_pretrained") or kind.startswith("wavlm_local:"):
        config = UpstreamConfig(kind) if ":" not in kind else UpstreamConfig("wavlm_local", kind.split(":", 1)[1])
        build_upstream(config)  # a tiny one is built (or copied from the shipped build) once per machine
        upstream = Upstream(config).eval()
        with torch.no_grad():
            for u in utterances.index:
                wav = audio.items[u]
                hidden, _ = upstream(wav[None], torch.tensor([len(wav)]))
                rows.append(hidden[:, 0].mean(1).flatten().numpy())
    else:
        raise SystemExit(f"--features: unknown {kind!r}; choose from evidence, voice, voice@S, log-mel, tiny, tiny_pretrained, wavlm_local:PATH")
    return pd.DataFrame(np.stack(rows), index=utterances.index)


class LinearHead:
    """Softmax regression on standardised features (statistics of the ids it was first fit on), trained
    with the project's class-balanced loss."""

    def __init__(self, features: pd.DataFrame, mean: torch.Tensor, std: torch.Tensor, weights: list[torch.Tensor]):
        self.features, self.mean, self.std, self.weights = features, mean, std, weights

    @classmethod
    def untrained(cls, features: pd.DataFrame, fit_ids) -> "LinearHead":
        train = torch.tensor(features.loc[list(fit_ids)].to_numpy(), dtype=torch.float32)
        return cls(features, train.mean(0), train.std(0) + 1e-6, [torch.zeros(features.shape[1], 9), torch.zeros(9)])

    def _x(self, ids) -> torch.Tensor:
        return (torch.tensor(self.features.loc[list(ids)].to_numpy(), dtype=torch.float32) - self.mean) / self.std

    def fitted(self, ids, targets, steps: int, lr: float, weight_decay: float) -> "LinearHead":
        weights = [w.clone().requires_grad_(True) for w in self.weights]
        x, y = self._x(ids), torch.as_tensor(targets, dtype=torch.float32)
        optimizer, class_weights = torch.optim.Adam(weights, lr=lr, weight_decay=weight_decay), class_balanced_weights(y)
        for _ in range(steps):
            loss = class_balanced_cross_entropy(x @ weights[0] + weights[1], y, class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return LinearHead(self.features, self.mean, self.std, [w.detach() for w in weights])

    def probs(self, ids) -> np.ndarray:
        return torch.softmax(self._x(ids) @ self.weights[0] + self.weights[1], -1).numpy()


class HeadAdapter:
    """A linear head as a protocol adapter: as fitted (Zero), or refit on the episode's support (Few)
    or pool (All) first."""

    def __init__(self, head: LinearHead, data: str = "", steps: int = 0, lr: float = 0.0, weight_decay: float = 0.0):
        self.head, self.data, self.fit = head, data, (steps, lr, weight_decay)

    def predict(self, episode) -> np.ndarray:
        head = self.head
        if self.data == "support":
            head = head.fitted(episode.support, episode.support_targets, *self.fit)
        elif self.data == "pool":
            head = head.fitted(episode.pool, episode.pool_targets, *self.fit)
        return head.probs(episode.query)


def room(corpus, features: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """maF1 and miF1 (%) of every row, mean over the unseen test annotators x seeds."""
    config = ProtocolConfig(seeds=SEEDS, shots=K, queries=Q, sweep_shots=())
    rows = []
    for split in rotation(corpus, "unseen"):
        adapters = {"oracle/aggregate": Oracle("oracle/aggregate", corpus, None),
                    "oracle/listener": Oracle("oracle/listener", corpus, split.test_annotator)}
        aggregated = split.aggregated_targets(corpus)
        for kind, table in features.items():
            zero = LinearHead.untrained(table, aggregated.index).fitted(aggregated.index, aggregated.to_numpy(np.float32),
                                                                        300, 1e-2, 1e-3)
            adapters[f"{kind}/zero"] = HeadAdapter(zero)
            adapters[f"{kind}/few"] = HeadAdapter(zero, "support", 50, 1e-3, 0.0)
            adapters[f"{kind}/all"] = HeadAdapter(zero, "pool", 200, 3e-3, 1e-3)
        rows += run_episodes(adapters, split.test_task(corpus), replace(config, methods=tuple(adapters)), {}, log=None)
    return 100 * pd.DataFrame(rows).groupby("method", sort=False)[["maF1", "miF1"]].mean()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="corpus seeds")
    parser.add_argument("--features", default="evidence,voice,log-mel,tiny,tiny_pretrained")
    parser.add_argument("--utterances", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        started = time.time()
        corpus = make_synthetic_corpus(seed=seed, n_utterances=args.utterances, progress=False)
        features = {kind: pooled_features(corpus, kind) for kind in args.features.split(",")}
        scores = room(corpus, features)
        shares = corpus.label_distribution(list(EXTERNAL_BIAS))
        print(f"\ncorpus seed {seed} ({time.time() - started:.0f}s): unseen, mean over 5 annotators x {SEEDS} episodes")
        print(scores.round(1).to_string())
        line = {"seed": seed,
                "oracle room maF1": scores.loc["oracle/listener", "maF1"] - scores.loc["oracle/aggregate", "maF1"],
                "neutral share": f"{shares.loc['neutral'].min():.0f}-{shares.loc['neutral'].max():.0f}%",
                "frustration share": f"{shares.loc['frustrated'].min():.0f}-{shares.loc['frustrated'].max():.0f}%"}
        for kind in features:
            line[f"{kind} room maF1"] = scores.loc[f"{kind}/all", "maF1"] - scores.loc[f"{kind}/zero", "maF1"]
        summary.append(line)
    print("\nroom = All - Zero (oracle: Listener - Aggregate), maF1 points; shares over E1..E5 (paper: neutral 5-48%, frustration 12-38%)")
    print(pd.DataFrame(summary).set_index("seed").round(1).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
