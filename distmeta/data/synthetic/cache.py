"""Where generated corpora live and how they are reused: one folder per generator config, regenerated when
the config, the generator or the audio files change; audio rendered in a process pool with progress."""

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from distmeta.data.corpus import Corpus, CorpusError
from distmeta.io import settings_digest
from distmeta.report import Progress


GENERATOR_VERSION = 3  # bump when the generative model changes, so caches of the old one are not reused
# The voices and the utterance plan alone (speakers, emotions, prosody, rendering), without the listeners: what
# the tiny upstream's pretraining audio depends on. Bump it with GENERATOR_VERSION when those change.
VOICE_VERSION = 2


def config_hash(config) -> str:
    """A generator config's identity (any of our corpus generators' dataclasses), for its cache folder."""
    fields = {k: v for k, v in asdict(config).items() if k != "workers"}  # workers do not change the corpus
    fields["generator_version"] = GENERATOR_VERSION
    return settings_digest(fields)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTMETA_CACHE", Path.home() / ".cache" / "distmeta"))


def render_all(render, jobs: list, workers: int, what: str | None, every: int) -> list:
    """`render(job)` for every job in a process pool (`workers` 0: one per core), results in order (the
    corpora's renderers return the seconds of audio written); with `what`, a progress line with ETA
    every `every` jobs."""
    results, progress = [], Progress(f"{what}: utterance", len(jobs), print if what else None)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, result in enumerate(pool.map(render, jobs, chunksize=16), 1):
            results.append(result)
            if i % every == 0 or i == len(jobs):
                progress.update(i)
    return results


def load_cached(out_dir: Path, digest: str) -> Corpus | None:
    """The corpus saved in `out_dir` if it was generated from the config with this hash and its audio
    files are those it wrote (same sizes and modification times), else None (regenerate)."""
    if (out_dir / "corpus.json").is_file():
        try:
            cached = Corpus.load(out_dir)
        except CorpusError:
            return None  # incomplete or foreign: regenerate
        if cached.info.get("config_hash") != digest:
            return None
        recorded = cached.info.get("audio_fingerprint")
        if recorded != cached.audio_fingerprint():
            why = "audio files changed since they were generated" if recorded else "no audio fingerprint recorded (older version)"
            print(f"{out_dir}: {why}; generating the corpus again", flush=True)
            return None
        return cached
    return None


def cached_corpus(out_dir, prefix: str, config) -> tuple[Path, Corpus | None]:
    """The folder a generated corpus lives in (`out_dir`, default `$DISTMETA_CACHE/<prefix>-<config hash>`) and
    the corpus already there if it was generated from `config` (else None: generate it)."""
    digest = config_hash(config)
    out_dir = Path(out_dir) if out_dir else default_cache_dir() / f"{prefix}-{digest}"
    return out_dir, load_cached(out_dir, digest)


def save_generated(corpus: Corpus, out_dir: Path) -> Corpus:
    """Save a freshly generated corpus, recording its audio files' fingerprint for `load_cached`."""
    corpus.info["audio_fingerprint"] = corpus.audio_fingerprint()
    corpus.save(out_dir)
    return corpus
