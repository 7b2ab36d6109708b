"""Loading a job from jobs/ the way `python jobs/<name>.py` runs it: the one loader every job test uses."""

import importlib.util
from pathlib import Path

import pytest

JOBS = Path(__file__).parents[2] / "jobs"


@pytest.fixture
def load_job():
    """`load_job("meta_train")` -> the module of jobs/meta_train.py, freshly executed."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def listener_smoke(tmp_path_factory) -> dict:
    """The listener smoke preset's corpus folder and models folder, shared by the job tests that run it (the
    main job's smoke test, the sweep test): models are cached by their settings, corpus fingerprint included,
    so a later test reuses what an earlier one trained, as a user's second run would. Tests that must train
    (on a small cluster, on two nodes) keep their own folders."""
    root = tmp_path_factory.mktemp("listener-smoke")
    return {"corpus": root / "corpus", "models": root / "models"}
