"""How much room the speaker corpus leaves to read enrollment pairs, and how much the encoder keeps, in minutes.

    .venv/bin/python benchmarks/bench_speaker_room.py [--seeds 0,1] [--maml] [key=value ...]
    .venv/bin/python benchmarks/bench_speaker_room.py data.speakers.idiosyncrasy=1.5 encoder.epochs=10

Calibrating the speaker corpus (docs/results/speaker.md) asks, per generator setting and corpus seed, the
questions of Table II's ceiling rows without training a speech LM: the job's own setup (corpus, speech
encoder pretrained on Ray Train, frozen frames), the classifier baselines, optionally MAML, and the
ceiling rows (`speaker/ceilings.py`) on the test speakers with the evaluation's enrollment draws. Overrides
are the ICL job's keys (`jobs/metaicl_train.py --print-config`). It prints, per seed:

    Oracle-Reader k = 0 .. 7, its room (7 - 0), Oracle-Speaker   what the generator allows
    Ceiling-Reader k = 0 .. 7, its room, Ceiling-Speaker         what the encoder's features allow
    Pretrained, Personalized_N, Personalized_A (and MAML 0 / 7)  what the baselines reach
    the per-speaker 95% interval of Ceiling-Reader 7 - 0 pairs

then the mean of each over the seeds. Models are kept under --models-dir, so a rerun reuses them.
"""

import argparse
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from distmeta import config as cfg
from distmeta.cluster import connect
from distmeta.data.sources import load_corpus
from distmeta.data.speakers import speaker_view
from distmeta.features import FrameBank
from distmeta.settings import MetaICLJobConfig
from distmeta.report import markdown_table
from distmeta.speaker import baselines, ceilings, metaicl
from distmeta.speaker import maml as speaker_maml
from distmeta.speaker.encoder import ready_upstream
from distmeta.speaker.tables import paired, table2


def one_seed(config: MetaICLJobConfig, with_maml: bool) -> tuple[dict, pd.DataFrame]:
    corpus = load_corpus(config.data)
    data = speaker_view(corpus)
    upstream = ready_upstream(config.upstream, config.encoder, corpus, data, config.models_dir, config.storage)
    bank = FrameBank.load(metaicl.frame_bank(corpus, upstream, config.encoder_layer, config.models_dir))
    seed = config.evaluation.seed
    rows = [ceilings.oracle_rows(corpus, data, seed), ceilings.feature_rows(bank, data, seed)]
    pretrained = None
    for name in baselines.BASELINES:
        model, _ = baselines.train_classifier(name, bank, data, config.classifier, log=None)
        rows.append(baselines.evaluate_classifier(name, model, bank, data, seed))
        pretrained = model if name == "Pretrained" else pretrained
    if with_maml:
        meta, _ = speaker_maml.meta_train(bank, data, pretrained, config.maml.meta, log=None)
        rows.append(speaker_maml.evaluate(meta, bank, data, config.maml.meta, seed, log=None))
    results = pd.concat([r for r in rows if len(r)], ignore_index=True)
    table = table2(results)
    summary = {}
    for model in ("Oracle-Reader", "Ceiling-Reader", "MAML"):
        part = table[table.index == model]
        if len(part):
            curve = part.set_index("ICL")["UA_spk"]
            summary.update({f"{model} 0": curve.iloc[0], f"{model} {len(curve) - 1}": curve.iloc[-1],
                            f"{model} room": curve.iloc[-1] - curve.iloc[0]})
    for model in ("Oracle-Speaker", "Ceiling-Speaker", "Pretrained", "Personalized_N", "Personalized_A"):
        if model in table.index:
            summary[model] = float(table.loc[model, "UA_spk"])
    comparison = paired(results)
    for name, row in comparison.iterrows():
        if name.startswith("Ceiling-Reader"):
            summary["Ceiling-Reader 7-0 interval"] = f"[{row['low']:+.3f}, {row['high']:+.3f}]"
    return summary, table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="speaker-corpus seeds, comma-separated")
    parser.add_argument("--maml", action="store_true", help="also meta-train MAML on speaker tasks (~1 minute)")
    parser.add_argument("--models-dir", default="runs/room-models")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the ICL job's config")
    args = parser.parse_args()
    base = cfg.parse_args(MetaICLJobConfig, [*args.overrides, f"models_dir={args.models_dir}"], job="metaicl_train")
    connect(base.ray_address)
    summaries = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        begun = time.time()
        config = replace(base, data=replace(base.data, speakers=replace(base.data.speakers, seed=seed)))
        summary, table = one_seed(config, args.maml)
        summaries[seed] = summary
        print(f"\nspeaker-corpus seed {seed} ({time.time() - begun:.0f} s)\n{markdown_table(table, '.3f')}", flush=True)
    frame = pd.DataFrame(summaries).T
    numeric = frame.drop(columns=[c for c in frame.columns if c.endswith("interval")])
    print("\nper seed:\n" + markdown_table(frame, ".3f"))
    print("\nmean over seeds:\n" + markdown_table(numeric.astype(float).mean().to_frame("mean").T, ".3f"))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
