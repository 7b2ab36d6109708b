"""Corpora, scenarios and tasks.

    from distmeta.data import Corpus, read_iemocap, read_manifest, make_synthetic_corpus
    corpus = read_iemocap(root)   # or read_manifest(path), make_synthetic_corpus(out_dir, seed=0)
    corpus.utterances             # DataFrame indexed by utterance id: path, speaker, session, duration, ...
    corpus.annotations            # DataFrame: utterance, annotator, one 0/1 column per class, raw
"""

from distmeta.data.audio import AudioError, load_audio
from distmeta.data.corpus import Corpus, CorpusError
from distmeta.data.iemocap import read_iemocap
from distmeta.data.manifest import read_manifest
from distmeta.data.scenarios import Split, Task, TooFewItems, make_task, rotation
from distmeta.data.synthetic import SyntheticConfig, make_synthetic_corpus, oracle_gap
from distmeta.labels import CLASSES

__all__ = ["CLASSES", "AudioError", "Corpus", "CorpusError", "Split", "SyntheticConfig", "Task", "TooFewItems",
           "load_audio", "make_synthetic_corpus", "make_task", "oracle_gap", "read_iemocap", "read_manifest", "rotation"]
