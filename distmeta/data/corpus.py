"""The corpus model: an utterances table and a per-annotator annotations table.

    utterances   DataFrame indexed by utterance id: path, speaker, session, duration, ...
    annotations  DataFrame: utterance, annotator, one 0/1 column per class (CLASSES order), raw

Every reader builds one of these and calls `validate`, which collects every
problem it finds and raises one CorpusError listing them all.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from distmeta.data.audio import AudioError, probe
from distmeta.io import atomic_path, write_json
from distmeta.labels import CLASSES

FORMAT_VERSION = 1
UTTERANCE_COLUMNS = ("path", "speaker", "session", "duration")
ANNOTATION_COLUMNS = ("utterance", "annotator", *CLASSES, "raw")
MAX_LISTED = 50


class CorpusError(ValueError):
    """One or more problems in a corpus; `problems` lists them all."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        lines = [f"{source}: {len(self.problems)} problem(s):", *(f"  - {p}" for p in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


@dataclass
class Corpus:
    utterances: pd.DataFrame
    annotations: pd.DataFrame
    name: str = "corpus"
    info: dict = field(default_factory=dict)  # provenance; for synthetic corpora, the ground truth

    # ---- views ---------------------------------------------------------------

    @property
    def annotators(self) -> list[str]:
        return sorted(self.annotations["annotator"].unique())

    @property
    def sessions(self) -> list[int]:
        return sorted(int(s) for s in self.utterances["session"].unique())

    def labels(self, annotator: str, utterances=None) -> pd.DataFrame:
        """One annotator's multi-hot labels, indexed by utterance (optionally only those in `utterances`)."""
        rows = self.annotations[self.annotations["annotator"] == annotator]
        if len(rows) == 0:
            raise KeyError(f"annotator {annotator!r} not in corpus {self.name!r}; annotators: {self.annotators}")
        table = rows.set_index("utterance")[list(CLASSES)]
        if utterances is not None:
            table = table[table.index.isin(utterances)]
        return table

    def aggregated(self, annotators=None, utterances=None) -> pd.DataFrame:
        """Vote distribution over `annotators` (all by default) per utterance, rows summing to 1."""
        rows = self.annotations
        if annotators is not None:
            rows = rows[rows["annotator"].isin(list(annotators))]
        if utterances is not None:
            rows = rows[rows["utterance"].isin(utterances)]
        votes = rows.groupby("utterance")[list(CLASSES)].sum().astype(np.float64)
        return votes.div(votes.sum(axis=1), axis=0)

    def label_distribution(self, annotators=None, utterances=None) -> pd.DataFrame:
        """Paper's Tables A1/A2: % of each class among an annotator's labels, and labels per item."""
        rows = self.annotations
        if utterances is not None:
            rows = rows[rows["utterance"].isin(utterances)]
        columns = {}
        for annotator in annotators or self.annotators:
            mine = rows[rows["annotator"] == annotator][list(CLASSES)]
            counts = mine.sum()
            share = 100.0 * counts / max(counts.sum(), 1)
            columns[annotator] = [*share.tolist(), counts.sum() / max(len(mine), 1)]
        return pd.DataFrame(columns, index=[*CLASSES, "# of annotations/data"])

    # ---- identity, for caches ---------------------------------------------------

    def audio_fingerprint(self) -> str:
        """The audio files as they are now: a digest of each utterance's path, size and modification time
        (ns), so audio rewritten in place is never served from a cache made before (reading every file for
        a content digest would cost minutes on IEMOCAP; size + mtime cost milliseconds)."""
        digest = hashlib.sha256()
        for utt, path in sorted(self.utterances["path"].items()):
            try:
                stat = os.stat(path)
                digest.update(f"{utt}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{utt}\0{path}\0missing\n".encode())
        return digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Everything of the corpus a trained model or a cached feature depends on: the audio files
        (`audio_fingerprint`), who spoke each utterance in which session, and every annotation."""
        digest = hashlib.sha256(self.audio_fingerprint().encode())
        digest.update(self.utterances[["speaker", "session"]].sort_index().to_csv().encode())
        digest.update(self.annotations[list(ANNOTATION_COLUMNS)].to_csv(index=False).encode())
        return digest.hexdigest()[:16]

    # ---- checks ---------------------------------------------------------------

    def validate(self, check_audio: bool = True, problems: list[str] | None = None) -> "Corpus":
        """Raise CorpusError listing every problem found (plus `problems` a reader already found)."""
        problems = list(problems or [])
        utts, ann = self.utterances, self.annotations
        missing = [c for c in UTTERANCE_COLUMNS if c not in utts.columns]
        missing += [c for c in ANNOTATION_COLUMNS if c not in ann.columns]
        if missing:
            raise CorpusError(self.name, problems + [f"missing column(s): {', '.join(missing)}"])
        if len(utts) == 0:
            problems.append("no utterances")
        for utt in utts.index[utts.index.duplicated()].unique():
            problems.append(f"duplicate utterance id {utt!r}")
        unknown = ann.loc[~ann["utterance"].isin(utts.index), "utterance"].unique()
        problems += [f"annotation refers to unknown utterance {u!r}" for u in unknown]
        dup = ann[ann.duplicated(["utterance", "annotator"], keep="first")]
        problems += [f"duplicate annotation of {u!r} by {a!r}" for u, a in zip(dup["utterance"], dup["annotator"])]
        values = ann[list(CLASSES)]
        bad_values = ~values.isin([0, 1]).all(axis=1)
        problems += [f"annotation of {u!r} by {a!r}: class columns must be 0 or 1"
                     for u, a in zip(ann.loc[bad_values, "utterance"], ann.loc[bad_values, "annotator"])]
        empty = (values.sum(axis=1) == 0) & ~bad_values
        problems += [f"annotation of {u!r} by {a!r} has no emotion label"
                     for u, a in zip(ann.loc[empty, "utterance"], ann.loc[empty, "annotator"])]
        labelled = ann.loc[~empty].groupby("annotator").size()
        problems += [f"annotator {a!r} has no labels" for a in ann["annotator"].unique() if a not in labelled.index]
        if check_audio:
            for utt, path in utts["path"].items():
                try:
                    probe(path)
                except AudioError as err:
                    problems.append(f"utterance {utt!r}: {err}")
        if problems:
            raise CorpusError(self.name, problems)
        return self

    # ---- storage ---------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write utterances.csv, annotations.csv and corpus.json (last: its presence marks a complete save)."""
        directory = Path(directory).resolve()
        utts = self.utterances.copy()
        utts["path"] = [_relative(p, directory) for p in utts["path"]]
        with atomic_path(directory / "utterances.csv") as tmp:
            utts.to_csv(tmp, index_label="utterance")
        with atomic_path(directory / "annotations.csv") as tmp:
            self.annotations.to_csv(tmp, index=False)
        write_json(directory / "corpus.json", {"format_version": FORMAT_VERSION, "name": self.name, "info": self.info})
        return directory

    @classmethod
    def load(cls, directory, check_audio: bool = False) -> "Corpus":
        directory = Path(directory).resolve()
        meta_path = directory / "corpus.json"
        if not meta_path.is_file():
            raise CorpusError(str(directory), ["not a saved distmeta corpus (no corpus.json)"])
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise CorpusError(str(meta_path), [f"format_version {meta.get('format_version')} != {FORMAT_VERSION}"])
        utts = pd.read_csv(directory / "utterances.csv", index_col="utterance", dtype={"utterance": str, "speaker": str})
        utts["path"] = [str(p if Path(p).is_absolute() else directory / p) for p in utts["path"]]
        ann = pd.read_csv(directory / "annotations.csv", dtype={"utterance": str, "annotator": str, "raw": str})
        ann["raw"] = ann["raw"].fillna("")
        corpus = cls(utts, ann, name=meta["name"], info=meta.get("info", {})).validate(check_audio=check_audio)
        corpus.annotations[list(CLASSES)] = corpus.annotations[list(CLASSES)].astype(np.int8)
        return corpus


def _relative(path, directory: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)


def build_annotations(records) -> pd.DataFrame:
    """Annotations table from (utterance, annotator, set-of-classes, raw) records."""
    rows = []
    for utterance, annotator, classes, raw in records:
        rows.append([utterance, annotator, *(int(c in classes) for c in CLASSES), raw])
    table = pd.DataFrame(rows, columns=list(ANNOTATION_COLUMNS))
    table[list(CLASSES)] = table[list(CLASSES)].astype(np.int8)
    return table
