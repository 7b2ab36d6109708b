"""The profile store: one folder, one `<person>.safetensors` per person; and `csv_rows`, the one reader of the
clip tables users hand to distmeta (labels, pairs, files to predict).

A profile is one file: the tensors, with the profile's JSON (the person, the kind, the base model's digest,
K, the classes, when it was made and by which distmeta) in the safetensors header's metadata. It is written
to a temporary file and renamed into place, so a reader sees the old profile or the new one, never half of
one, and two enrollments of one person at once leave one whole profile (the last). The store also keeps, per
base model, where it was last found (`bases/<digest>.json`: its path or `models:/` URI), so a profile finds
its base model by digest. The default folder is `$DISTMETA_HOME/profiles` (~/.local/share/distmeta/profiles).
"""

import csv
import json
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distmeta.io import atomic_path, write_json
from distmeta.tracking import home

VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # matched whole (fullmatch): no newline, no '/'


class ProfileError(KeyError):
    """An unknown or malformed profile id."""

    def __str__(self) -> str:
        return str(self.args[0])


class ProfileConflict(ValueError):
    """Enrolling over a profile of another kind or base model without being told to."""


def check_id(person: str) -> str:
    if not isinstance(person, str) or not VALID_ID.fullmatch(person):
        raise ProfileError(f"profile id {person!r}: use letters, digits, '_', '.' and '-' (at most 128, "
                           f"starting with a letter or digit)")
    return person


class ProfileStore:
    def __init__(self, folder=None):
        self.folder = Path(folder) if folder else home() / "profiles"

    def path(self, person: str) -> Path:
        """The profile's file (whether or not it exists); a bad id is a ProfileError."""
        return self.folder / f"{check_id(person)}.safetensors"

    def stamp(self, person: str) -> int:
        """The profile's modification time (ns): what a server compares to notice a re-enrollment."""
        try:
            return self.path(person).stat().st_mtime_ns
        except FileNotFoundError:
            raise ProfileError(f"no profile {person!r}") from None

    def save(self, person: str, tensors: dict, meta: dict, overwrite: bool = False) -> Path:
        """Write the profile in one rename. Over a profile of another kind or base model only with
        `overwrite`."""
        path = self.path(person)
        if path.is_file() and not overwrite:
            try:
                old = self.meta(person)
            except ValueError:
                old = {}  # unreadable: nothing to keep
            if old and (old.get("kind"), old.get("base")) != (meta.get("kind"), meta.get("base")):
                raise ProfileConflict(f"profile {person!r} is a {old.get('kind')} profile of base model {old.get('base')}; "
                                      f"enrolling a {meta.get('kind')} profile of {meta.get('base')} over it needs overwrite")
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"profile": json.dumps({**meta, "person": person})})
        return path

    def meta(self, person: str) -> dict:
        """The profile's JSON, read from the header alone."""
        path = self.path(person)
        if not path.is_file():
            raise ProfileError(f"no profile {person!r} in {self.folder}")
        try:
            with safe_open(str(path), "pt") as f:
                return json.loads((f.metadata() or {})["profile"])
        except Exception as err:  # a file that is not a profile: named, never a crash of the caller
            raise ValueError(f"profile {person!r}: unreadable ({type(err).__name__})") from None

    def load(self, person: str) -> tuple[dict, dict]:
        meta = self.meta(person)
        return load_file(str(self.path(person))), meta

    def list(self) -> list[dict]:
        """Every profile's JSON; one that cannot be read is listed with its `error`, so one bad file never hides
        the others."""
        found = []
        for path in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []:
            try:
                found.append(self.meta(path.stem))
            except (ProfileError, ValueError) as err:
                found.append({"person": path.stem, "error": str(err)})
        return found

    def delete(self, person: str) -> None:
        path = self.path(person)
        if not path.is_file():
            raise ProfileError(f"no profile {person!r} in {self.folder}")
        path.unlink()

    def remember_base(self, digest: str, kind: str, where: str) -> None:
        """Record where the base model of this digest was found (a path or a models:/ URI)."""
        write_json(self.folder / "bases" / f"{digest}.json", {"digest": digest, "kind": kind, "where": str(where)})

    def base_record(self, digest: str) -> dict | None:
        record = self.folder / "bases" / f"{digest}.json"
        return json.loads(record.read_text()) if re.fullmatch(r"[0-9a-f]{16}", digest) and record.is_file() else None


def model_file(path, kind: str = "listener or speaker") -> Path:
    """A base model's safetensors file, checked to have its JSON sidecar: a path, a folder holding one model
    (a registered model's files), or a registered model (`models:/distmeta-<kind>/<version>`, `/latest` or
    `@<alias>`, downloaded once into the registry cache)."""
    folder = Path(path) if Path(path).is_dir() else None
    if str(path).startswith("models:/"):
        from distmeta.tracking import registered_files

        folder = registered_files(str(path))
    if folder is not None:
        # a speech LM is registered with the speech encoder it reads (loaded from beside it, profiles.speaker)
        found = sorted(p for p in folder.rglob("*.safetensors") if not p.name.startswith("speech_encoder-"))
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


def csv_rows(source, columns: tuple[str, ...], name=None):
    """(line number, row, its clip's path) for every row of a CSV with at least `columns` (a missing column or
    value is an error naming the CSV and line). `source`: a CSV file, whose relative paths are relative to it;
    or an open text stream (an uploaded labels.csv), whose paths are given as written. `name`: what errors
    call the CSV (default its path)."""
    stream = not isinstance(source, (str, Path))
    name = name or source
    with (source if stream else open(source, newline="")) as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{name}: missing column(s) {sorted(missing)}; expected {','.join(columns)}")
        for line, row in enumerate(reader, start=2):
            empty = [c for c in columns if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{name}, line {line}: no value for {', '.join(empty)}")
            clip = row["path"].strip()
            if not stream and not Path(clip).is_absolute():
                clip = str(Path(source).parent / clip)
            yield line, row, clip
