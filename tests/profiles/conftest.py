"""A meta-trained listener model as jobs/meta_train.py saves it, shared by the profile tests."""

import csv

import pytest

from distmeta.data import rotation
from distmeta.labels import CLASSES
from distmeta.listener.adapters import Episode
from distmeta.meta.learner import MetaConfig
from distmeta.listener.metatrain import meta_train_cached
from distmeta.models import UpstreamConfig

TRAINED_WITH = MetaConfig(ini=False, outer_steps=2, shots=8, val_every=2, val_seeds=1, val_queries=8, test_steps=4,
                          inner_steps=2, inner_lr=0.05, outer_lr=1e-2, val_steps=4)


@pytest.fixture(scope="session")
def trained(small_corpus, tmp_path_factory):
    """A meta-trained model as jobs/meta_train.py saves it, and a meta-test episode of its test annotator."""
    split = rotation(small_corpus, "unseen")[0]
    path = tmp_path_factory.mktemp("models") / "meta.safetensors"
    state = meta_train_cached(path, small_corpus, split, UpstreamConfig(), None, TRAINED_WITH, {}, log=None)
    task = split.test_task(small_corpus)
    support, query = task.sample(8, 12, seed=3)
    episode = Episode(3, [task.utterances[i] for i in support], task.targets[support], [task.utterances[i] for i in query])
    return split, path, state, episode


@pytest.fixture(scope="session")
def labels_csv():
    """write(path, corpus, ids, targets): a labels CSV (path, labels) for those utterances."""
    def write(path, corpus, ids, targets):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "labels"])
            for u, t in zip(ids, targets):
                writer.writerow([corpus.utterances.loc[u, "path"], ";".join(c for c, v in zip(CLASSES, t) if v > 0.5)])
    return write


@pytest.fixture(scope="session")
def registered(trained, tmp_path_factory):
    """(version, tracking URI): the trained model registered as `distmeta-listener` (pyfunc, alias champion) in
    a store of its own, as jobs/meta_train.py registers its Meta-PerSER model. Tests point
    MLFLOW_TRACKING_URI at it themselves."""
    from distmeta import tracking
    from distmeta.profiles.mlflow_model import log_model

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        path = trained[1]
        with tracking.run("pyfunc-test", "run", {}):
            version = log_model([path, path.with_suffix(".json")], "distmeta-listener", metrics={"unseen.maF1": 0.5},
                                aliases=("champion",), tags={"scenario": "unseen"})
    return version, uri
