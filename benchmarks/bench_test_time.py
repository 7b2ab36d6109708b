"""Test-time fine-tuning settings (learning rate, steps) for Entire-Few and Meta-PerSER, chosen on the
validation annotators, from the models of finished default runs.

    .venv/bin/python benchmarks/bench_test_time.py RUN [RUN ...] [--grid 1e-4:50,3e-4:20,1e-3:10]
        [--steps 5,10,20,30,50] [--head-first rates:20,3e-2:50] [--scenario unseen] [--role val|test]
        [--out rows.csv]
    .venv/bin/python benchmarks/bench_test_time.py --summarize rows.csv [more.csv ...]

RUN: the `out` folder of a finished `jobs/meta_train.py` run; its config.yaml names the corpus and the
`models_dir` holding each split's SSL-E and Meta-PerSER models.

A fair baseline has Entire-Few's rate and steps chosen on the validation annotator, the way Meta-PerSER's
settings are, never on test annotators; and both fine-tune the whole model at meta-test, which is most of the
default run's time, so fewer steps at a higher rate would be worth having if the validation annotators say
they lose nothing. For every split of the scenario this fine-tunes both starts (SSL-E: Entire-Few; the
meta-trained model: Meta-PerSER's `test_adapt: finetune` with `test_rate_steps: 0`) on episodes of the split's validation annotator
(`--role val`: K=32 support and Q=128 queries from their validation pool, seeds 10000+s as in model
selection) with each grid rate up to its step cap, scoring the queries at each `--steps` checkpoint along
one trajectory. `--role test` scores the protocol's own test episodes instead: for reporting a choice made
on `val`, never for making it. `--summarize` prints the mean maF1 / miF1 per (start, rate, steps), the best
per start on the validation rows, and the paired Meta-PerSER minus Entire-Few at each setting.

`--head-first` adds trajectories that first adapt the start's head alone on the support's pooled features
and then fine-tune as above (docs/listener.md, "The learned rates first"): `rates:N` takes N steps with
Meta-PerSER's learned per-step rates (the MAML rule it was meta-trained for; Meta-PerSER only): its meta-test
with `meta.test_rate_steps: N` (today's default: rates:10 at the grid point 3e-4, 10 steps). `LR:N` takes N
SGD steps at the fixed rate LR for both starts (for Entire-Few the linear-probe-then-fine-tune recipe, LP-FT).
Step 0 along such a trajectory scores the head phase alone.
"""

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from distmeta import config as cfg
from distmeta.data.scenarios import rotation
from distmeta.data.sources import load_corpus
from distmeta.features import inputs_for
from distmeta.io import write_text
from distmeta.settings import MetaTrainConfig
from distmeta.listener.adapters import _probs
from distmeta.meta.maml import MetaModel
from distmeta.listener.metatest import learned_rate_steps
from distmeta.listener.metatrain import build_meta_model, meta_model_path
from distmeta.listener.pretrain import load_pretrained
from distmeta.metrics import multilabel_scores
from distmeta.report import markdown_table
from distmeta.models.ser import set_scope
from distmeta.training.fit import fine_tune

K, Q, SEEDS = 32, 128, 3
NONE = "none"  # the head_first column of plain fine-tuning


def head_phase(start: str, model, meta: MetaModel, spec: str, inputs, targets):
    """A copy of `model` whose head took the `--head-first` phase `spec` on (inputs, targets), or None where
    the phase does not apply (learned rates exist for Meta-PerSER only)."""
    rate, steps = spec.split(":")
    if rate == "rates":  # Meta-PerSER's meta-test with `meta.test_rate_steps: N`
        if start != "Meta-PerSER":
            return None
        learner = meta
    else:  # every head parameter at one fixed SGD rate
        learner = MetaModel(set_scope(model.clone(), "head"), int(steps), float(rate))
    adapted = model.clone()
    adapted.load_state_dict(learned_rate_steps(learner, inputs, targets, int(steps)), strict=False)
    return adapted


def trajectories(run: Path, scenario: str, role: str, grid: dict, checkpoints: list, head_first=(),
                 log=print) -> list[dict]:
    """Rows (one per split, episode, start, rate and checkpoint) for one finished run."""
    config = cfg.load(MetaTrainConfig, run / "config.yaml")
    corpus = load_corpus(config.data, progress=False)
    rows = []
    for split in rotation(corpus, scenario, config.protocol.test_annotators or None):
        folder = Path(config.models_dir) / scenario / split.test_annotator
        ssl_e = load_pretrained("ssl_e", config.upstream, folder / "ssl_e.safetensors")
        meta = build_meta_model(config.upstream, None, replace(config.meta, ini=False))
        meta.load_state_dict(load_file(str(meta_model_path(config.models_dir, scenario, split.test_annotator, config.meta))))
        task = split.val_task(corpus) if role == "val" else split.test_task(corpus)
        bank = inputs_for(ssl_e.upstream, task.utterances, None, corpus, config.pretrain.max_seconds)  # conv: frozen, shared
        for seed in range(SEEDS):
            support, query = task.sample(K, Q, seed=10_000 + seed if role == "val" else seed)
            support_ids, query_ids = [task.utterances[i] for i in support], [task.utterances[i] for i in query]
            inputs, targets = bank.batch(support_ids), torch.as_tensor(task.targets[support])
            starts = (("Entire-Few", ssl_e), ("Meta-PerSER", meta.model))
            for (start, model), head in itertools.product(starts, (NONE, *head_first)):
                began = time.time()
                first = model if head == NONE else head_phase(start, model, meta, head, inputs, targets)
                if first is None:
                    continue
                head_seconds = time.time() - began  # counted in every trajectory that starts from this head phase
                for lr, cap in grid.items():
                    began = time.time() - head_seconds
                    label = dict(corpus_seed=config.data.seed, scenario=scenario, split=split.test_annotator, role=role,
                                 annotator=task.annotator, seed=seed, start=start, head_first=head, lr=lr)

                    def score(step, adapted):
                        if step in checkpoints:
                            probs = _probs(adapted, bank, query_ids, config.protocol.adapt.batch_size)
                            rows.append({**label, "steps": step, **multilabel_scores(probs, task.targets[query]),
                                         "seconds": round(time.time() - began, 2)})

                    if head != NONE:
                        score(0, first)
                    torch.manual_seed(config.meta.seed)
                    fine_tune(set_scope(first.clone(), "entire"), inputs, targets, steps=cap, lr=lr, on_step=score)
        log(f"corpus seed {config.data.seed} {scenario} {split.test_annotator} ({role} {task.annotator}): "
            f"{len(rows)} rows", flush=True)
    return rows


def summarize(rows: pd.DataFrame) -> None:
    rows = rows.assign(head_first=rows["head_first"].fillna(NONE) if "head_first" in rows else NONE)  # older files
    setting = ["start", "head_first", "lr", "steps"]
    for role, part in rows.groupby("role"):
        means = part.groupby(setting)[["maF1", "miF1"]].mean().mul(100).round(1)
        counts = part.groupby(setting).size().rename("episodes")
        print(f"\n## {role} episodes, corpus seeds {sorted(map(int, part.corpus_seed.unique()))}: mean maF1 / miF1 (%)\n")
        print(markdown_table(pd.concat([means, counts], axis=1)))
        keys = ["corpus_seed", "scenario", "split", "seed", "head_first", "lr", "steps"]
        both = part[part.start == "Meta-PerSER"].merge(part[part.start == "Entire-Few"], on=keys, suffixes=("", "_few"))
        diff = both.assign(maF1=100 * (both.maF1 - both.maF1_few), miF1=100 * (both.miF1 - both.miF1_few))
        print(f"\n## {role}: paired Meta-PerSER minus Entire-Few at the same setting (points)\n")
        print(markdown_table(diff.groupby(setting[1:])[["maF1", "miF1"]].mean(), ".2f"))
        if role == "val":
            for start, group in means.groupby(level="start"):
                best = group["maF1"].max()
                # ties (within 0.1 point) go to the cheaper setting: fewer steps
                pick = group[group["maF1"] >= best - 0.1].reset_index().sort_values(["steps", "lr"]).iloc[0]
                print(f"\nbest on validation for {start}: head first {pick.head_first}, lr {pick.lr:g}, "
                      f"{int(pick.steps)} steps "
                      f"(maF1 {pick.maF1:.1f}, miF1 {pick.miF1:.1f})")


def _is_rate(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--grid", default="1e-4:50,3e-4:20,1e-3:10", help="rate:step cap, comma-separated")
    parser.add_argument("--steps", default="5,10,20,30,50", help="checkpoints scored along each trajectory")
    parser.add_argument("--head-first", default="", help="head phases before fine-tuning, comma-separated: "
                        "rates:N (Meta-PerSER's learned rates) or LR:N (fixed-rate SGD, both starts)")
    parser.add_argument("--scenario", default="unseen", choices=["seen", "unseen"])
    parser.add_argument("--role", default="val", choices=["val", "test"])
    parser.add_argument("--out", type=Path, default=Path("bench_test_time.csv"))
    parser.add_argument("--summarize", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(pd.concat([pd.read_csv(path) for path in args.summarize]))
        return 0
    torch.set_num_threads(1)  # as an episode actor runs
    grid = {float(lr): int(cap) for lr, cap in (item.split(":") for item in args.grid.split(","))}
    checkpoints = [int(s) for s in args.steps.split(",")]
    head_first = [spec for spec in args.head_first.split(",") if spec]
    for spec in head_first:
        rate, _, steps = spec.partition(":")
        if not steps.isdigit() or (rate != "rates" and not _is_rate(rate)):
            parser.error(f"--head-first {spec!r}: expected rates:N or LR:N (e.g. rates:20, 3e-2:50)")
    rows = []
    for run in args.runs:
        rows += trajectories(run, args.scenario, args.role, grid, checkpoints, head_first)
        write_text(args.out, pd.DataFrame(rows).to_csv(index=False))  # what is done so far survives an interruption
    summarize(pd.DataFrame(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
