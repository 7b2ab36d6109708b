import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # as the jobs run (distmeta/cluster.py), before any test imports Ray

from distmeta.data import make_synthetic_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A 300-utterance synthetic corpus, generated once per test session."""
    return make_synthetic_corpus(tmp_path_factory.mktemp("synthetic"), seed=3, n_utterances=300, progress=False)


@pytest.fixture(scope="session", autouse=True)
def distmeta_home(tmp_path_factory):
    """Tests keep their MLflow store out of the user's ~/.local/share/distmeta."""
    import os

    home = tmp_path_factory.mktemp("distmeta_home")
    previous = os.environ.get("DISTMETA_HOME")
    os.environ["DISTMETA_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("DISTMETA_HOME", None)
    else:
        os.environ["DISTMETA_HOME"] = previous
