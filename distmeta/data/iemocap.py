"""Read IEMOCAP_full_release: categorical evaluations of every annotator.

Each `Session{n}/dialog/EmoEvaluation/*.txt` holds, per utterance, a header line

    [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]

followed by one categorical line per annotator, tab-separated:

    C-E2:<TAB>Neutral; Anger;<TAB>(free text, may hold spaces)

`C-E1`..`C-E6` are the external evaluators (annotator ids as written). `C-F1`
and `C-M1` are the self-reports of the session's female and male actor; each
actor is one annotator whose id is the actor's speaker id, e.g. `Ses01F`.
Dimensional lines (`A-E3: val 3; ...`) are skipped. "Other" is dropped; an
annotation left with no class is dropped; an annotator left with no labels is
an error. When an annotator labels one utterance twice, the labels are merged.
"""

import re
from pathlib import Path

import pandas as pd

from distmeta.data.corpus import Corpus, CorpusError, build_annotations
from distmeta.labels import parse_labels

_HEADER = re.compile(r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\t(?P<utt>\S+)\t")
_CATEGORICAL = re.compile(r"^C-(?P<who>[A-Z]+\d*):\t(?P<labels>[^\t]*)")


def speaker_of(utterance: str) -> str:
    """`Ses01F_impro01_M013` -> `Ses01M`: the session prefix plus the gender letter of the turn."""
    return utterance[:5] + utterance.rsplit("_", 1)[1][0]


def wav_path(root: Path, utterance: str) -> Path:
    session = int(utterance[3:5])
    dialog = utterance.rsplit("_", 1)[0]  # script dialogs have three parts: Ses01F_script01_1
    return root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utterance}.wav"


def read_iemocap(root, check_audio: bool = True) -> Corpus:
    """Corpus of every utterance with a categorical evaluation under IEMOCAP_full_release `root`."""
    root = Path(root)
    files = sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt"))
    if not files:
        raise CorpusError(str(root), ["no Session*/dialog/EmoEvaluation/*.txt files: is this IEMOCAP_full_release?"])
    problems, utterances, labels = [], {}, {}
    seen_annotators, dropped = set(), 0
    for file in files:
        current = None
        for lineno, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            header = _HEADER.match(line)
            if header:
                current = header["utt"]
                if current in utterances:
                    problems.append(f"{file}:{lineno}: duplicate utterance id {current!r}")
                    continue
                utterances[current] = {
                    "path": str(wav_path(root, current)),
                    "speaker": speaker_of(current),
                    "session": int(current[3:5]),
                    "duration": float(header["end"]) - float(header["start"]),
                    "start": float(header["start"]),
                }
                continue
            cat = _CATEGORICAL.match(line)
            if not cat:
                continue
            if current is None:
                problems.append(f"{file}:{lineno}: evaluation line before any utterance header")
                continue
            who = cat["who"]
            annotator = current[:5] + who[0] if who[0] in "FM" and who[1:] in ("", "1") else f"C-{who}"
            seen_annotators.add(annotator)
            classes, raw, errors = parse_labels(cat["labels"])
            problems += [f"{file}:{lineno}: {error}" for error in errors]
            if not classes:
                dropped += 1
                continue
            entry = labels.setdefault((current, annotator), [set(), []])
            entry[0] |= classes
            entry[1] += raw
    kept = {a for _, a in labels}
    problems += [f"annotator {a!r} has no labels in the nine classes" for a in sorted(seen_annotators - kept)]
    utts = pd.DataFrame.from_dict(utterances, orient="index")
    utts.index.name = "utterance"
    records = [(u, a, classes, "; ".join(raw)) for (u, a), (classes, raw) in labels.items()]
    info = {"source": "iemocap", "root": str(root.resolve()), "dropped_other_only": dropped}
    corpus = Corpus(utts, build_annotations(records), name=str(root), info=info)
    return corpus.validate(check_audio=check_audio, problems=problems)
