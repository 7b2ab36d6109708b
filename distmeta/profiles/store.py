"""The profile store: one folder, one `<person>.safetensors` + `<person>.json` per person; and `csv_rows`,
the one reader of the clip tables users hand to distmeta (labels, pairs, files to predict).

The JSON names the person, the kind, the base model it belongs to (its digest), K, the classes, when it was
made and by which distmeta. The tensors are written first and the JSON last, each atomically, so a profile
whose JSON is on disk is complete. The default folder is `$DISTMETA_HOME/profiles`
(~/.local/share/distmeta/profiles).
"""

import csv
import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from distmeta.io import atomic_path, write_json
from distmeta.tracking import home

VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ProfileError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class ProfileStore:
    def __init__(self, folder=None):
        self.folder = Path(folder) if folder else home() / "profiles"

    def _paths(self, person: str) -> tuple[Path, Path]:
        if not VALID_ID.match(person):
            raise ProfileError(f"profile id {person!r}: use letters, digits, '_', '.' and '-' (at most 128)")
        return self.folder / f"{person}.safetensors", self.folder / f"{person}.json"

    def sidecar(self, person: str) -> Path:
        """The profile's JSON (whether or not it exists); a bad id is a ProfileError."""
        return self._paths(person)[1]

    def save(self, person: str, tensors: dict, meta: dict) -> Path:
        weights, sidecar = self._paths(person)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        write_json(sidecar, {**meta, "person": person})
        return sidecar

    def load(self, person: str) -> tuple[dict, dict]:
        weights, sidecar = self._paths(person)
        if not sidecar.is_file():
            raise ProfileError(f"no profile {person!r} in {self.folder}")
        return load_file(str(weights)), json.loads(sidecar.read_text())

    def meta(self, person: str) -> dict:
        return self.load(person)[1]

    def list(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))] if self.folder.is_dir() else []

    def delete(self, person: str) -> None:
        weights, sidecar = self._paths(person)
        if not sidecar.is_file():
            raise ProfileError(f"no profile {person!r} in {self.folder}")
        sidecar.unlink()  # first: a weights file without its JSON is not a profile
        weights.unlink(missing_ok=True)


def model_file(path, kind: str = "listener or speaker") -> Path:
    """A base model's safetensors file, checked to have its JSON sidecar: a path, or a registered model
    (`models:/distmeta-<kind>/<version>`, downloaded once into the registry cache)."""
    if str(path).startswith("models:/"):
        from distmeta.tracking import registered_files

        # a speech LM is registered with the speech encoder it reads (loaded from beside it, profiles.speaker)
        found = sorted(p for p in registered_files(str(path)).glob("*.safetensors") if not p.name.startswith("speech_encoder-"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one .safetensors model, found {[p.name for p in found]}")
        path = found[0]
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        where = {"listener": "jobs/meta_train.py writes under models_dir/<scenario>/<annotator>/meta-*",
                 "speaker": "jobs/metaicl_train.py writes as models_dir/speech_lm-*-TU_LU"}
        raise FileNotFoundError(f"{path}: not a {kind} model (a .safetensors file with its .json sidecar, as "
                                + " or ".join(v for k, v in where.items() if k in kind) + ")")
    return path


def file_digest(path) -> str:
    """What a profile records of its base model: the first 16 hex digits of the file's SHA-256."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def csv_rows(path, columns: tuple[str, ...]):
    """(line number, row, its clip's path) for every row of a CSV with at least `columns` (a missing one is an
    error naming the file); `path` is relative to the CSV unless absolute."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected {','.join(columns)}")
        for line, row in enumerate(reader, start=2):
            clip = Path(row["path"])
            yield line, row, str(clip if clip.is_absolute() else path.parent / clip)
