"""The two kinds of profile behind one interface, for the `distmeta` command and the server.

    base = load_base("models:/distmeta-speaker/1")       # a ListenerBase or a SpeakerBase, by what the file holds
    tensors, meta = enroll_from(base, "alice.csv")         # listener: path,labels; speaker: path,label (<= 7 rows)
    rows = predict_with(base, files, tensors, meta)        # one row per file
"""

import json

from distmeta.profiles import listener, speaker
from distmeta.profiles.store import model_file


def load_base(path):
    """The base model at `path` (a file or a models:/ URI): a speech LM (its sidecar names its encoder) is a
    speaker model, anything else must be a Meta-PerSER listener model."""
    found = model_file(path)
    if "encoder_dim" in json.loads(found.with_suffix(".json").read_text()):
        return speaker.SpeakerBase.load(found)
    return listener.ListenerBase.load(found)


def kind_of(base) -> str:
    return "speaker" if isinstance(base, speaker.SpeakerBase) else "listener"


def enroll_from(base, table) -> tuple[dict, dict]:
    """Enroll from a labelled CSV in the base model's kind's format."""
    if kind_of(base) == "speaker":
        return speaker.enroll(base, speaker.read_pairs(table, base.words))
    return listener.enroll(base, listener.read_labelled(table))


def predict_with(base, files, tensors=None, meta=None, progress=None) -> list[dict]:
    if kind_of(base) == "speaker":
        return speaker.predict(base, files, tensors, meta, progress=progress)
    return listener.predict(base, files, tensors, progress=progress)
