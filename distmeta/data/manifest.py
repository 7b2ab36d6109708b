"""Bring your own corpus: a CSV manifest with one row per utterance x annotator.

    utterance,path,speaker,session,annotator,labels[,duration]
    u0001,wav/u0001.wav,spk1,1,rater_a,Neutral
    u0001,wav/u0001.wav,spk1,1,rater_b,angry; frustrated

- `path` is absolute or relative to the manifest's folder.
- `session` is an integer (it drives the unseen-data split).
- `labels` holds one or more label strings separated by `;`: the class names
  (frustrated, angry, sad, disgust, excited, fear, neutral, surprise, happy) or
  IEMOCAP's spellings (Frustration, Neutral state, hap, ...). `Other` is dropped.
- `duration` (seconds) is optional; when absent it is read from the audio header.
- Utterance fields (path, speaker, session, duration) must agree on every row of
  an utterance. Extra columns are kept in the utterances table.
"""

import csv
from pathlib import Path

import pandas as pd

from distmeta.data.audio import AudioError, probe
from distmeta.data.corpus import Corpus, CorpusError, build_annotations
from distmeta.labels import parse_labels

REQUIRED = ("utterance", "path", "speaker", "session", "annotator", "labels")


def read_manifest(path, check_audio: bool = True, name: str | None = None) -> Corpus:
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise CorpusError(str(path), [f"cannot open manifest: {err}"]) from err
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(str(path), [f"line 1: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}"])
        extra = [c for c in reader.fieldnames if c not in REQUIRED]
        problems, utterances, records, seen = [], {}, [], {}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            utt = (row["utterance"] or "").strip()
            if not utt:
                problems.append(f"{where}: empty utterance id")
                continue
            fields = {"path": row["path"].strip(), "speaker": row["speaker"].strip()}
            try:
                fields["session"] = int(row["session"])
            except (TypeError, ValueError):
                problems.append(f"{where}: session {row['session']!r} is not an integer")
                continue
            if not fields["path"]:
                problems.append(f"{where}: empty path")
                continue
            audio = Path(fields["path"])
            fields["path"] = str(audio if audio.is_absolute() else (path.parent / audio).resolve())
            fields.update({c: row[c] for c in extra if c != "duration"})
            if row.get("duration"):
                try:
                    fields["duration"] = float(row["duration"])
                except ValueError:
                    problems.append(f"{where}: duration {row['duration']!r} is not a number")
            if utt in utterances:
                clash = [k for k in fields if utterances[utt].get(k) != fields[k]]
                if clash:
                    problems.append(f"{where}: utterance {utt!r} disagrees with its earlier row on {', '.join(clash)}")
            else:
                utterances[utt] = fields
            annotator = (row["annotator"] or "").strip()
            if not annotator:
                problems.append(f"{where}: empty annotator")
                continue
            key = (utt, annotator)
            if key in seen:
                problems.append(f"{where}: utterance {utt!r} annotated by {annotator!r} again (first on line {seen[key]})")
                continue
            seen[key] = reader.line_num
            classes, raw, errors = parse_labels(row["labels"])
            problems += [f"{where}: {error}" for error in errors]
            if not raw:
                problems.append(f"{where}: no emotion label")
            elif classes:
                records.append((utt, annotator, classes, "; ".join(raw)))
    labelled = {a for _, a, _, _ in records}
    problems += [f"annotator {a!r} has no labels in the nine classes" for a in sorted({a for _, a in seen} - labelled)]
    for utt, fields in utterances.items():
        if "duration" not in fields:
            try:
                info = probe(fields["path"])
                fields["duration"] = info.frames / info.samplerate
            except AudioError:
                fields["duration"] = float("nan")  # reported by validate when check_audio
    utts = pd.DataFrame.from_dict(utterances, orient="index", columns=["path", "speaker", "session", "duration", *extra])
    utts.index.name = "utterance"
    info = {"source": "manifest", "path": str(path.resolve())}
    corpus = Corpus(utts, build_annotations(records), name=name or str(path), info=info)
    return corpus.validate(check_audio=check_audio, problems=problems)
