"""The nine emotion classes and the label strings that map onto them.

Order is fixed: every multi-hot vector, logit and metric in distmeta
uses it. IEMOCAP's tenth category, "Other", is dropped.
"""

CLASSES = ("frustrated", "angry", "sad", "disgust", "excited", "fear", "neutral", "surprise", "happy")
NUM_CLASSES = len(CLASSES)

# Label strings seen in IEMOCAP's EmoEvaluation files and in its three-letter
# codes, plus our own class names, all lower-cased. None means "drop".
_ALIASES = {
    "frustration": "frustrated", "fru": "frustrated",
    "anger": "angry", "ang": "angry",
    "sadness": "sad", "sad": "sad",
    "disgust": "disgust", "dis": "disgust",
    "excited": "excited", "excitement": "excited", "exc": "excited",
    "fear": "fear", "fea": "fear",
    "neutral state": "neutral", "neutral": "neutral", "neu": "neutral",
    "surprise": "surprise", "sur": "surprise",
    "happiness": "happy", "happy": "happy", "hap": "happy", "joy": "happy",  # joy: the ICL paper's word
    "other": None, "oth": None,
}
_ALIASES.update({c: c for c in CLASSES})


class UnknownLabel(ValueError):
    pass


def canonical_label(text: str) -> str | None:
    """Map one label string to a class name, or None for a dropped category ("Other")."""
    key = " ".join(text.strip().lower().split())
    if key not in _ALIASES:
        raise UnknownLabel(f"unknown emotion label {text!r}; known: {', '.join(sorted(_ALIASES))}")
    return _ALIASES[key]


def parse_labels(text: str | None) -> tuple[set[str], list[str], list[str]]:
    """One annotation's labels, joined by ';' (IEMOCAP's evaluation lines, the manifest's `labels` column,
    an enrollment CSV): (the class names, the label strings as written, an error per unknown string)."""
    raw = [s.strip() for s in (text or "").split(";") if s.strip()]
    classes, errors = set(), []
    for label in raw:
        try:
            name = canonical_label(label)
        except UnknownLabel as err:
            errors.append(str(err))
            continue
        if name is not None:
            classes.add(name)
    return classes, raw, errors
