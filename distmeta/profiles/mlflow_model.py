"""Registered models that MLflow's own tools load: the pyfunc flavour, by loader module.

    mlflow.pyfunc.load_model("models:/distmeta-listener/1").predict(pd.DataFrame({"audio": [wav_bytes]}),
                                                                    params={"top_k": 3})
    mlflow models serve -m models:/distmeta-listener@champion --env-manager local     # distmeta installed

A registered model holds the model's files as they are (safetensors weights + JSON sidecar; a speech LM with
the speech encoder it reads) under the pyfunc's data path, and names this module as its loader: MLflow calls
`_load_pyfunc(data_path)`, which builds a `Personalizer`. Nothing is pickled. The input is a table with one
column `audio`, each a whole audio file's bytes (base64 in `mlflow models serve`'s JSON), and the param
`top_k` (0: every label); each output row is `distmeta predict`'s record: `scores` sorted, and `labels` for a
listener model. The model version carries the signature, an input example, the run's metrics and its tags.
"""

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from distmeta.profiles.personalizer import Personalizer


class PersonalizerModel:
    """What `mlflow.pyfunc.load_model` returns the predictions of: the base model, no profile."""

    def __init__(self, personalizer: Personalizer):
        self.personalizer = personalizer

    def predict(self, model_input, params=None) -> list[dict]:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "audio" not in frame:
            raise ValueError(f"expected a column `audio` (each an audio file's bytes), got {list(frame.columns)}")
        top_k = int((params or {}).get("top_k") or 0) or None
        clips = [bytes(a) for a in frame["audio"]]
        return self.personalizer.classify(clips, top_k=top_k)


def _load_pyfunc(data_path):
    """MLflow's entry point for a model logged with this loader module."""
    return PersonalizerModel(Personalizer.from_pretrained(Path(data_path)))


def example_clip(seconds: float = 1.0) -> bytes:
    """A short WAV (a quiet tone) for the model's input example."""
    import soundfile as sf

    t = np.arange(int(16_000 * seconds)) / 16_000
    out = io.BytesIO()
    sf.write(out, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def log_model(files: list, name: str, tags: dict | None = None, metrics: dict | None = None,
              aliases: tuple = ()) -> int:
    """Log `files` (the model first, its sidecar, anything it loads from beside it) as a pyfunc model of the
    active run, register it as `name`, link the run's `metrics` and set `aliases`; returns the version."""
    import mlflow
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "model"
        data.mkdir()
        for file in files:
            shutil.copy(file, data)
        personalizer = Personalizer.from_pretrained(data / Path(files[0]).name)
        example = pd.DataFrame({"audio": [example_clip()]})
        signature = infer_signature(example, PersonalizerModel(personalizer).predict(example), params={"top_k": 0})
        info = mlflow.pyfunc.log_model(
            name=name, loader_module=__name__, data_path=str(data), signature=signature, input_example=example,
            registered_model_name=name, pip_requirements=_requirements(),
            tags={**(tags or {}), "kind": personalizer.kind, "digest": personalizer.digest},
            metadata={"kind": personalizer.kind, "digest": personalizer.digest, "labels": personalizer.labels})
    if metrics:
        mlflow.log_metrics(metrics, model_id=info.model_id)
    version = int(info.registered_model_version)
    for alias in aliases:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def _requirements() -> list[str]:
    """distmeta's pinned dependencies (distmeta itself is installed from its checkout: ./setup.sh)."""
    from importlib.metadata import requires

    return [r.split(";")[0].strip() for r in requires("distmeta") or [] if "extra ==" not in r]
