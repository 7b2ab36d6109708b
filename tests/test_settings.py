"""Every job's config and its presets: configs/<job>/default.yaml is the reference a user reads, so it
must say exactly what the dataclass does; every preset loads; --print-config shows what a job runs with."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distmeta import config as cfg
from distmeta.settings import JOBS

ROOT = Path(__file__).parents[1]


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    return {key for name, value in d.items()
            for key in (leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name})}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_default_yaml_lists_every_key_with_its_default(job):
    cls = JOBS[job]
    path = cfg.PRESETS / job / "default.yaml"
    written = yaml.safe_load(path.read_text())
    assert cfg.to_dict(cfg.load(cls, preset=path)) == cfg.to_dict(cls()), f"{path} differs from distmeta.settings"
    expected = leaf_keys(cfg.to_dict(cls()))
    if job == "tune":  # `base` and `icl_base` are job configs: configs/meta_train, metaicl_train/default.yaml document them
        expected = {k for k in expected if not k.startswith(("base.", "icl_base."))}
    assert expected <= leaf_keys(written), f"{path} lacks {sorted(expected - leaf_keys(written))}"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_preset_loads_and_every_job_has_smoke(job):
    found = cfg.presets(job)
    assert {"default", "smoke"} <= set(found)
    for path in found.values():
        cfg.load(JOBS[job], preset=path)  # unknown keys or wrong types name the file


def test_tune_smoke_trials_start_from_the_meta_train_smoke_preset():
    meta = cfg.load(JOBS["meta_train"], preset=cfg.PRESETS / "meta_train" / "smoke.yaml")
    tune = cfg.load(JOBS["tune"], preset=cfg.PRESETS / "tune" / "smoke.yaml")
    assert cfg.differences(cfg.to_dict(meta), cfg.to_dict(tune.base)) == ["meta.val_every: 2 -> 1", "meta.val_shots: 0 -> 8"]
    icl = cfg.load(JOBS["metaicl_train"], preset=cfg.PRESETS / "metaicl_train" / "smoke.yaml")
    assert cfg.differences(cfg.to_dict(icl), cfg.to_dict(tune.icl_base)) == []


def test_print_config_of_a_job_from_its_own_command_line(tmp_path):
    """Through `python jobs/<job>.py` as a user types it: the preset file, then an override."""
    printed = subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--preset", "smoke", "--print-config",
                              "pretrain.epochs=3"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    config = yaml.safe_load(printed)
    assert config["pretrain"]["epochs"] == 3 and config["data"]["n_utterances"] == 300
    assert config["protocol"]["test_annotators"] == ["E1", "E2"]
