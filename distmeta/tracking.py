"""MLflow: every job run is an MLflow run.

The tracking URI is `MLFLOW_TRACKING_URI` when set (e.g. a team server),
otherwise a local SQLite store, `mlflow.db` in the working directory (browse it
with `mlflow ui --backend-store-uri sqlite:///mlflow.db`, which binds to
127.0.0.1). Library code only logs; it never starts a server.
"""

import os
from contextlib import contextmanager
from pathlib import Path

from distmeta.config import flatten

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


@contextmanager
def run(experiment: str, run_name: str, params: dict):
    """Start an MLflow run with flattened `params`; yields the mlflow module for logging."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as active:
        flat = flatten(params)
        for start in range(0, len(flat), 100):  # MLflow caps params per batch
            mlflow.log_params(dict(list(flat.items())[start:start + 100]))
        print(f"MLflow: experiment {experiment!r}, run {active.info.run_id} at {mlflow.get_tracking_uri()}", flush=True)
        yield mlflow
