"""Where a job's corpus comes from: one typed config, one loader."""

from dataclasses import dataclass, field
from typing import Literal

from distmeta.data.corpus import Corpus
from distmeta.data.iemocap import read_iemocap
from distmeta.data.manifest import read_manifest
from distmeta.data.synthetic import SpeakerCorpusConfig, SyntheticConfig, make_speaker_corpus, make_synthetic_corpus


@dataclass
class DataConfig:
    source: Literal["synthetic", "speakers", "iemocap", "manifest"] = "synthetic"
    path: str = ""  # IEMOCAP_full_release root, manifest CSV, or a synthetic corpus folder ("" = cache)
    seed: int = 0  # synthetic corpus seed
    n_utterances: int = 2500  # synthetic corpus size
    check_audio: bool = True  # open every audio header when reading a real corpus
    speakers: SpeakerCorpusConfig = field(default_factory=SpeakerCorpusConfig)  # the many-speaker corpus (source=speakers)


def load_corpus(config: DataConfig, progress: bool = True) -> Corpus:
    if config.source == "synthetic":
        synthetic = SyntheticConfig(seed=config.seed, n_utterances=config.n_utterances)
        return make_synthetic_corpus(config.path or None, config=synthetic, progress=progress)
    if config.source == "speakers":
        return make_speaker_corpus(config.path or None, config.speakers, progress=progress)
    if not config.path:
        raise ValueError(f"data.path is required for data.source={config.source!r}")
    if config.source == "iemocap":
        return read_iemocap(config.path, check_audio=config.check_audio)
    return read_manifest(config.path, check_audio=config.check_audio)
