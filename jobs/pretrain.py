"""Pretrain the models the few-shot methods start from, for every split of the rotation, on Ray Train.

    python jobs/pretrain.py                               # SSL-E, Linear and Multi on the synthetic corpus
    python jobs/pretrain.py kinds=[ssl_e] protocol.scenarios=[unseen]
    python jobs/pretrain.py upstream.name=wavlm_base pretrain.num_workers=4 pretrain.use_gpu=true ray_address=auto

Models land under `models_dir/<scenario>/<test annotator>/<kind>.safetensors`
(JSON sidecar: settings, best epoch and losses); `jobs/meta_train.py` with the
same settings reuses them.
"""

import sys
import time
from dataclasses import asdict

from distmeta import config as cfg
from distmeta import tracking
from distmeta.cluster import connect
from distmeta.data.scenarios import rotation
from distmeta.data.sources import load_corpus
from distmeta.settings import PretrainJobConfig
from distmeta.training.tiny_wavlm import ready as build_upstream
from distmeta.listener.pretrain import pretrain_rotation


def main(argv=None) -> int:
    config = cfg.parse_args(PretrainJobConfig, argv, job="pretrain", description=__doc__.split("\n")[0])
    unknown = sorted(set(config.kinds) - {"ssl_e", "linear", "multi"})
    if unknown:
        raise SystemExit(f"kinds: unknown {unknown}; choose from ssl_e, linear, multi")
    started = time.time()
    cfg.save(config, f"{config.out}/config.yaml")
    description = f"Supervised pretraining ({', '.join(config.kinds)}) on {config.upstream.name}, every split of the rotation"
    tags = {"path": "listener", "upstream": config.upstream.name, "corpus": config.data.source, "seed": config.data.seed}
    with tracking.run(config.experiment, f"pretrain-{config.upstream.name}", asdict(config), description, tags) as mlflow:
        connect(config.ray_address)
        corpus = load_corpus(config.data)
        build_upstream(config.upstream)
        splits = {s: rotation(corpus, s, config.protocol.test_annotators or None) for s in config.protocol.scenarios}
        checkpoints = pretrain_rotation(config.kinds, config.data, config.upstream, config.pretrain, splits, config.models_dir,
                                        config.storage)
        for (scenario, test), paths in checkpoints.items():
            for kind, path in paths.items():
                print(f"{scenario:7s} {test:5s} {kind:7s} {path}")
                sidecar = path.with_suffix(".json")
                mlflow.log_artifact(str(sidecar), artifact_path=f"{scenario}/{test}")
        mlflow.log_metric("wall_seconds", time.time() - started)
    print(f"wall time {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
