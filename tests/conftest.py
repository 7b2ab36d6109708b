import pytest

from distmeta.data import make_synthetic_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A 300-utterance synthetic corpus, generated once per test session."""
    return make_synthetic_corpus(tmp_path_factory.mktemp("synthetic"), seed=3, n_utterances=300, progress=False)
