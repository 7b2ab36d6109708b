"""Build (or read and check) a corpus and describe its listeners.

    python jobs/make_corpus.py                                   # synthetic listeners corpus, seed 0
    python jobs/make_corpus.py data.source=iemocap data.path=/data/IEMOCAP_full_release
    python jobs/make_corpus.py --preset smoke --out runs/corpus-smoke

Writes under `out`: the resolved config, Table A1 (per-annotator label
distribution; csv, md and a heatmap png) and, for synthetic corpora, the oracle
gap (how much better a listener's own perception model predicts their labels
than the average listener's).
"""

import sys
import time
from pathlib import Path

import pandas as pd

from distmeta import config as cfg
from distmeta.data.sources import load_corpus
from distmeta.data.synthetic import oracle_gap
from distmeta.settings import MakeCorpusConfig
from distmeta.report import markdown_table, save_heatmap, save_table


def main(argv=None) -> int:
    config = cfg.parse_args(MakeCorpusConfig, argv, job="make_corpus", description=__doc__.split("\n")[0])
    out = Path(config.out)
    cfg.save(config, out / "config.yaml")
    started = time.time()
    corpus = load_corpus(config.data)
    seconds = time.time() - started
    print(f"corpus {corpus.name}: {len(corpus.utterances)} utterances, {len(corpus.annotations)} annotations, "
          f"{len(corpus.annotators)} annotators, loaded/generated in {seconds:.1f}s")
    table = corpus.label_distribution()
    table.index.name = "class"
    save_table(table, out, "table_a1", "Per-annotator label distribution (%), Table A1 layout", ".2f")
    save_heatmap(table.iloc[:-1], out / "table_a1.png", f"{corpus.name}: labels per annotator (%)")
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print("\nTable A1: per-annotator label distribution (%)\n" + markdown_table(table, ".1f"))
    if corpus.info.get("listeners"):
        gap = oracle_gap(corpus)
        save_table(gap, out, "oracle_gap", "Oracle macro-F1 on each listener's own labels", ".3f")
        print("Oracle gap (macro-F1 on the listener's own labels)\n" + markdown_table(gap, ".3f"))
        print(f"mean over listeners: personal {gap.personal_maF1.mean():.3f}, aggregate {gap.aggregate_maF1.mean():.3f}, "
              f"gap {gap.gap_maF1.mean():+.3f}")
    print(f"\nwritten to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
