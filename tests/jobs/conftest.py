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
