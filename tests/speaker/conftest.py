"""Toy speakers for the speaker path's tests: frames that encode the emotion plus a speaker offset."""

import numpy as np
import pytest
import torch

from distmeta.data.speakers import EMOTIONS, SpeakerData, SpeakerTask
from distmeta.features import FrameBank


def toy_data(n_speakers=9, per_emotion=3, dim=8, seed=0):
    """Speakers whose frames encode the emotion plus a speaker offset (learnable), split 5/2/2."""
    rng = np.random.default_rng(seed)
    bank, data = FrameBank(), SpeakerData(EMOTIONS, {"train": [], "valid": [], "test": []})
    for s in range(n_speakers):
        offset = rng.normal(0, 0.5, dim)
        utts, labels = [], []
        for e in range(len(EMOTIONS)):
            for t in range(per_emotion):
                u = f"s{s}_{e}_{t}"
                length = int(rng.integers(3, 7))
                frame = np.eye(dim)[e] + offset
                bank.items[u] = torch.tensor(frame + rng.normal(0, 0.1, (length, dim)), dtype=torch.float32)
                utts.append(u)
                labels.append(e)
        split = "train" if s < 5 else "valid" if s < 7 else "test"
        data.splits[split].append(SpeakerTask(f"s{s}", tuple(utts), np.array(labels)))
    return data, bank


@pytest.fixture(scope="module")
def toy_speakers():
    """(SpeakerData, FrameBank): 9 speakers (5 train, 2 valid, 2 test), 3 utterances per emotion."""
    return toy_data()


@pytest.fixture(scope="session")
def speaker_corpus(tmp_path_factory):
    """(DataConfig, Corpus): a generated many-speaker corpus with audio, 12 speakers x 7 emotions x 2 utterances."""
    from distmeta.data.sources import DataConfig, load_corpus
    from distmeta.data.synthetic import SpeakerCorpusConfig

    data = DataConfig(source="speakers", path=str(tmp_path_factory.mktemp("speakers")),
                      speakers=SpeakerCorpusConfig(n_speakers=12, per_emotion=2, workers=2))
    return data, load_corpus(data, progress=False)
