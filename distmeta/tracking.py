"""MLflow: every job run is an MLflow run, in one store a user finds.

The tracking URI is `MLFLOW_TRACKING_URI` when set (a team server, see
docs/outputs.md), otherwise one SQLite store per user, `$DISTMETA_HOME/mlflow.db`
(`DISTMETA_HOME` defaults to ~/.local/share/distmeta), with run artifacts beside
it in `mlartifacts/`. Absolute on purpose: under `ray job submit` the working
directory is Ray's temporary copy, and a store there would vanish with it.
Browse it with `mlflow ui --backend-store-uri sqlite:///$HOME/.local/share/distmeta/mlflow.db`
(binds 127.0.0.1). The main jobs register their models in its Model Registry (`distmeta-listener`,
`distmeta-speaker`), so `models:/distmeta-listener/1` names one. Library code only logs; it never starts a
server.
"""

import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from distmeta.config import flatten


def home() -> Path:
    """Where distmeta keeps what outlives a run's folder: the MLflow store."""
    return Path(os.environ.get("DISTMETA_HOME") or Path.home() / ".local" / "share" / "distmeta").resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store; None for any other store (a server)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside its file (MLflow's own default is relative to the working
    directory); a server decides for itself (None)."""
    database = sqlite_file(uri)
    return None if database is None else (database.parent / "mlartifacts").resolve().as_uri()


KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's model-training view, not its GenAI one


def use_experiment(mlflow, experiment: str) -> None:
    """Set the tracking URI and experiment, creating the experiment with its artifacts beside the store and
    marked as model development (an experiment made before is marked too)."""
    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location(uri), tags=KIND)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another process
    found = mlflow.set_experiment(experiment)
    if found.tags.get("mlflow.experimentKind") != KIND["mlflow.experimentKind"]:
        mlflow.set_experiment_tag("mlflow.experimentKind", KIND["mlflow.experimentKind"])


def metric_name(*parts) -> str:
    """The one way a job names an MLflow metric: its parts joined with ".", each part's characters other than
    letters, digits and "_" replaced by "_" (e.g. ("unseen", "Entire-Few", "maF1") -> "unseen.Entire_Few.maF1")."""
    return ".".join(re.sub(r"[^A-Za-z0-9_]", "_", str(part)) for part in parts)


@contextmanager
def run(experiment: str, run_name: str, params: dict, description: str | None = None, tags: dict | None = None):
    """Start an MLflow run with flattened `params`, a description and tags (what the UI shows and filters by);
    yields the mlflow module for logging."""
    import mlflow

    use_experiment(mlflow, experiment)
    with mlflow.start_run(run_name=run_name, description=description,
                          tags={k: str(v) for k, v in (tags or {}).items()}) as active:
        flat = flatten(params)
        for start in range(0, len(flat), 100):  # MLflow caps params per batch
            mlflow.log_params(dict(list(flat.items())[start:start + 100]))
        print(f"MLflow: experiment {experiment!r}, run {active.info.run_id} at {mlflow.get_tracking_uri()}", flush=True)
        yield mlflow


def model_version(uri: str) -> tuple[str, str]:
    """(name, version) of a registry URI: `models:/<name>/<version>`, `models:/<name>/latest` or
    `models:/<name>@<alias>`, resolved to the version number it names now."""
    from mlflow import MlflowClient

    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    if version == "latest":
        versions = MlflowClient().search_model_versions(f"name='{name}'")
        if not versions:
            raise FileNotFoundError(f"{uri}: no registered model {name!r}")
        return name, str(max(int(v.version) for v in versions))
    return name, version


def registered_files(uri: str) -> Path:
    """The folder holding a registered model's files (`models:/<name>/<version or latest or @alias>`),
    downloaded once into $DISTMETA_HOME/registry: an alias or `latest` is resolved to its version first, and the
    cache is kept per tracking store, since another store's version 1 is another model."""
    import hashlib

    import mlflow

    store = tracking_uri()
    mlflow.set_tracking_uri(store)
    name, version = model_version(uri) if not uri.startswith("models:/m-") else (uri[len("models:/"):], "")
    folder = (home() / "registry" / hashlib.sha256(store.encode()).hexdigest()[:12]
              / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}/{version}"))
    if not folder.is_dir():
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}" if version else uri, dst_path=str(staging))
        staging.rename(folder)
    return folder


class StepMetrics:
    """A meta-training's per-step metrics, sent to its MLflow run in one batch per validation step: each
    call is a database write, and one per outer step of every training adds up to many seconds of the
    driver's CPU. The curves in MLflow are the same, up to `val_every` steps behind."""

    def __init__(self, run_id: str):
        self.run_id, self.pending = run_id, []

    def add(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, record["step"]) for k, v in record.items() if k != "step"]
        if "val_loss" in record:
            self.flush()

    def flush(self) -> None:
        import mlflow

        if self.pending:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=self.pending)
            self.pending = []
