"""The listener tests' shared setting: a tiny random SER model, one episode of the small corpus, its banks."""

import pytest
import torch

from distmeta.features import PooledBank
from distmeta.listener.adapters import Episode
from distmeta.models import SERModel, Upstream, UpstreamConfig


@pytest.fixture(scope="module")
def setting(small_corpus):
    from distmeta.data import rotation
    from distmeta.features import AudioBank

    torch.manual_seed(0)
    model = SERModel(Upstream(UpstreamConfig()))
    task = rotation(small_corpus, "seen")[0].test_task(small_corpus)
    support, query = task.sample(8, 12, seed=1)
    episode = Episode(1, [task.utterances[i] for i in support], task.targets[support], [task.utterances[i] for i in query])
    audio = AudioBank(small_corpus, episode.support + episode.query)
    return model, audio, PooledBank(model.upstream, audio), episode
