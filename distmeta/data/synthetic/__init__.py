"""The embedded default corpora, generated from a seed: synthetic voices (voice), listeners who each
perceive emotion their own way (listeners: the listener path's corpus), speakers who each express it their
own way (speakers: the speaker path's corpus), and the cache both live in (cache)."""

from distmeta.data.synthetic.cache import default_cache_dir
from distmeta.data.synthetic.listeners import SyntheticConfig, make_synthetic_corpus, oracle_gap
from distmeta.data.synthetic.speakers import SpeakerCorpusConfig, make_speaker_corpus

__all__ = ["SpeakerCorpusConfig", "SyntheticConfig", "default_cache_dir", "make_speaker_corpus", "make_synthetic_corpus",
           "oracle_gap"]
