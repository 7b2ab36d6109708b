"""Speaker personalization by in-context learning end to end: MetaICL on Ray Train, then the paper's Tables II-IV.

    python jobs/metaicl_train.py                   # synthetic speakers, a speech encoder pretrained here + tiny T5, local Ray, local MLflow
    python jobs/metaicl_train.py --preset smoke    # the same in a few minutes
    ray job submit --working-dir . -- python jobs/metaicl_train.py data.source=manifest data.path=/data/speakers.csv \\
        upstream.name=wavlm_base model.llm=/models/flan-t5-base model.num_queries=150 meta.num_workers=4 meta.use_gpu=true

1. setup:     the corpus seen by speaker (train / validation / test speakers); the speech encoder,
              pretrained on the training speakers' emotions as a Ray Train run (speaker/encoder.py; any
              s3prl upstream instead with upstream.name=...), then frozen; its frames, computed once and
              kept under `models_dir`; the LLM (`model.llm: tiny_icl`: the shipped in-context-pretrained
              T5, built once for other settings, training/icl_llm.py).
2. train:     one Ray Train run: stage 1 (no enrollment pairs), then stage 2 (MetaICL) from stage 1
              for TU+LU, and with `ablation=true` TO+LD (7 shots) and Neutral (0..7) for Table IV, with
              `baselines` 1-shot_N (one neutral pair). Models already in `models_dir` with the same
              settings are reused; an interrupted model resumes from its last Ray Train checkpoint.
3. baselines: the ceiling rows (speaker/ceilings.py: the generator's Oracle-Speaker and Oracle-Reader,
              the learned Ceiling-Speaker and Ceiling-Reader on the encoder's features), the classifier baselines Scratch (the encoder's own pretraining model, encoder + SER
              head: trained from random weights on log-mel), Pretrained, Personalized_N, Personalized_A; then MAML
              on speaker tasks from Pretrained (the listener path's meta-learner, one Ray task actor per
              group of training speakers), adapted at test time on the same enrollment pairs the LM reads.
              They run in the driver while step 2 goes on, as soon as one of its stage-2 runs has ended.
4. evaluate:  k-shot inference on the test speakers; results.csv (one row per prediction),
              table2 / table3 / table4 (.md, .csv), shots.png, config.yaml under `out`.
The job is one MLflow run: per-model training curves, the tables as metrics and artifacts.
"""

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from distmeta import config as cfg
from distmeta import tracking
from distmeta.speaker import baselines, ceilings, evaluate, metaicl, tables
from distmeta.speaker import maml as speaker_maml
from distmeta.speaker.encoder import pretrain_encoder, ready_upstream
from distmeta.cluster import beside_workers, connect
from distmeta.data.sources import load_corpus
from distmeta.data.speakers import speaker_view
from distmeta.features import FrameBank
from distmeta.meta.actors import ActorPool
from distmeta.profiles.mlflow_model import log_model
from distmeta.report import save_table
from distmeta.settings import MetaICLJobConfig
from distmeta.training import icl_llm


@contextmanager
def phase(timing: dict, name: str):
    """Adds the wall seconds of the block to timing[name]."""
    begun = time.time()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.time() - begun


def classifier_baselines_and_maml(config, corpus, data, bank, mlflow, timed) -> list[pd.DataFrame]:
    """Table II's classifier rows (Scratch, Pretrained, Personalized_N, Personalized_A) and MAML's per-k rows,
    each phase timed in `timed(name)`. One torch thread (`beside_workers`): they run beside a Ray Train worker,
    and with one thread in every layout they round alike whether stage 2 ran side by side or in turn."""
    rows, pretrained = [], None
    with beside_workers():
        with timed("ceilings"):  # how much the pairs can tell, on the same draws as every model
            rows += [ceilings.oracle_rows(corpus, data, config.evaluation.seed), ceilings.feature_rows(bank, data, config.evaluation.seed)]
        if config.baselines:
            print("classifier baseline Scratch: the speech encoder's pretraining model", flush=True)
            with timed("Scratch"):  # nothing to train when the encoder above is this run (the default)
                scratch = pretrain_encoder(corpus, data, config.encoder, config.models_dir, config.storage)
                rows.append(baselines.evaluate_scratch(scratch, corpus, data))
            for name in baselines.BASELINES:
                print(f"classifier baseline {name}", flush=True)
                with timed(name):
                    model, _ = baselines.train_classifier(name, bank, data, config.classifier)
                    rows.append(baselines.evaluate_classifier(name, model, bank, data, config.evaluation.seed))
                pretrained = model if name == "Pretrained" else pretrained
        # MAML on speaker tasks, from the Pretrained classifier, on Ray task actors
        if config.maml.enabled:
            with timed("MAML"):
                if pretrained is None:
                    pretrained, _ = baselines.train_classifier("Pretrained", bank, data, config.classifier)
                actors = ActorPool(config.maml.actors) if config.maml.distributed else None
                where = f"{config.maml.actors.max_actors or 'one per speaker'} task actors" if actors else "serial"
                print(f"MAML on {len(data.splits['train'])} training speakers ({where})", flush=True)
                meta, result = speaker_maml.meta_train(bank, data, pretrained, config.maml.meta, actors=actors)
                if actors:
                    actors.shutdown()
                mlflow.log_metric(tracking.metric_name("best_val_loss", "MAML"), result["best_val_loss"])
                rows.append(speaker_maml.evaluate(meta, bank, data, config.maml.meta, config.evaluation.seed))
    return rows


def main(argv=None) -> int:
    config = cfg.parse_args(MetaICLJobConfig, argv, job="metaicl_train", description=__doc__.split("\n")[0])
    started = time.time()
    cfg.save(config, f"{config.out}/config.yaml")
    description = (f"Speaker ICL: the MetaICL speech LM ({config.model.llm}) on {config.upstream.name}, {config.data.source} "
                   f"corpus (seed {config.data.seed}), with its baselines, ceilings and Tables II-IV")
    tags = {"path": "speaker", "upstream": config.upstream.name, "corpus": config.data.source, "seed": config.data.seed}
    with tracking.run(config.experiment, f"metaicl-{config.upstream.name}-{config.model.llm}", asdict(config), description,
                      tags) as mlflow:
        # setup
        corpus = load_corpus(config.data)
        data = speaker_view(corpus)
        print("speakers: " + ", ".join(f"{s} {len(t)}" for s, t in data.splits.items()) + f"; emotions {list(data.words)}")
        empty = [split for split, tasks in data.splits.items() if not tasks]
        if empty:
            raise SystemExit(f"corpus {corpus.name}: no speakers in split(s) {empty}; each of train/valid/test needs one")
        connect(config.ray_address)
        timing = {"corpus": time.time() - started}  # the job's time profile, phase by phase
        # the frozen speech encoder: pretrained on the training speakers (a Ray Train run) unless saved already
        with phase(timing, "speech encoder"):
            upstream = ready_upstream(config.upstream, config.encoder, corpus, data, config.models_dir, config.storage)
        with phase(timing, "frames"):
            frames = metaicl.frame_bank(corpus, upstream, config.encoder_layer, config.models_dir)
        with phase(timing, "LLM"):  # the shipped tiny_icl, or built once for other settings
            icl_llm.ready(config.model)
        # train: the speech LMs on Ray Train, in the background. Stage 2's runs end at different times (1-shot_N
        # reads one pair, TU+LU up to seven), so the driver trains the classifier
        # baselines and MAML on the core the first one gives back instead of leaving it idle.
        trainings = ["TU+LU"] + (["TO+LD", "Neutral"] if config.ablation else []) + (["Neutral1"] if config.baselines else [])
        speech_lms_phase = "speech LMs (stage 1 + " + ", ".join(trainings) + ")"
        # set once a run has ended while another still trains, or once the training is over (or failed)
        core_free, beside = threading.Event(), set()  # beside: phases begun while the speech LMs still trained

        def train_speech_lms() -> dict:
            with phase(timing, speech_lms_phase):
                return metaicl.metaicl_train_many(config.data, upstream, config.encoder_layer, config.model, config.meta,
                                                  trainings, frames, config.models_dir, config.storage,
                                                  on_run_done=lambda runs_left: runs_left and core_free.set())

        timing[speech_lms_phase] = 0.0  # (first in the profile: it starts first)
        bank = FrameBank.load(frames)  # the classifiers, MAML and the evaluation read it
        with ThreadPoolExecutor(1) as background:
            speech_lms = background.submit(train_speech_lms)
            speech_lms.add_done_callback(lambda _: core_free.set())  # runs once the result (or error) is in
            core_free.wait()
            if speech_lms.done():
                speech_lms.result()  # a failed training stops the job here

            @contextmanager
            def timed(name: str):
                if not speech_lms.done():
                    beside.add(name)
                with phase(timing, name):
                    yield

            rows = classifier_baselines_and_maml(config, corpus, data, bank, mlflow, timed)
            models = speech_lms.result()
        for training, path in models.items():
            sidecar = path.with_suffix(".json")
            mlflow.log_artifact(str(sidecar), artifact_path="models")
            mlflow.log_metric(tracking.metric_name("best_val_loss", training), json.loads(sidecar.read_text())["best_val_loss"])
        # evaluate
        with phase(timing, "speech LM evaluation"):
            for training, path in models.items():
                rows.append(evaluate.evaluate_speech_lm(metaicl.load_speech_lm(path), bank, data, training, config.evaluation))
        results = pd.concat([r for r in rows if len(r)], ignore_index=True)
        paths = tables.save_results(results, data, config.out)
        for path in paths.values():
            mlflow.log_artifact(str(path))
        metrics = {}
        for name, row in tables.table2(results).iterrows():
            parts = ("UA_spk", name) + ((row["ICL"],) if row["ICL"] != "-" else ())
            metrics[tracking.metric_name(*parts)] = float(row["UA_spk"])
        mlflow.log_metrics(metrics)
        # the proposed model (TU+LU), for use: models:/distmeta-speaker/<version> (pyfunc), with its encoder
        encoder = [Path(upstream.path), Path(upstream.path).with_suffix(".json")] if upstream.name == "speech_encoder" else []
        version = log_model([models["TU+LU"], models["TU+LU"].with_suffix(".json"), *encoder], "distmeta-speaker",
                            metrics=metrics, tags={"path": "speaker", "upstream": config.upstream.name})
        print(f"registered {models['TU+LU']} as models:/distmeta-speaker/{version}", flush=True)
        timing["total"] = time.time() - started
        profile = pd.DataFrame({"seconds": list(timing.values()),
                                "beside the speech LMs": ["yes" if name in beside else "" for name in timing]}, index=list(timing))
        paths["timing"] = save_table(profile, config.out, "timing", "Wall seconds per phase (those beside the speech LMs "
                                     "ran while they trained, on the cores they left)", ".0f")
        mlflow.log_artifact(str(paths["timing"]))
        for name in ("table2", "paired", "table3", "table4", "timing"):
            if name in paths:
                print(paths[name].read_text())
        mlflow.log_metric("wall_seconds", time.time() - started)
    print(f"wall time {time.time() - started:.0f}s; results under {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
