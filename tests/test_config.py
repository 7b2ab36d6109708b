from dataclasses import dataclass, field
from typing import Literal

import pytest

from distmeta import config as cfg


@dataclass
class Inner:
    lr: float = 0.001
    steps: int = 5
    name: Literal["a", "b"] = "a"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    shots: tuple[int, ...] = (2, 4)
    out: str = "runs/x"
    tag: str | None = None


def test_precedence_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 7\n  lr: 0.5\n")
    preset = tmp_path / "smoke.yaml"
    preset.write_text("inner: {steps: 1, name: b}\n")
    loaded = cfg.load(Outer, path, ["inner.lr=0.25", "shots=[8, 16]"], preset=preset)
    assert loaded == Outer(Inner(lr=0.25, steps=7, name="b"), shots=(8, 16))


def test_round_trip_through_yaml(tmp_path):
    original = cfg.load(Outer, None, ["inner.steps=3", "tag=hello"])
    cfg.save(original, tmp_path / "resolved.yaml")
    assert cfg.load(Outer, tmp_path / "resolved.yaml") == original


@pytest.mark.parametrize("override, message", [
    ("inner.lrr=1", "inner.lrr"),
    ("inner.steps=1.5", "inner.steps must be int"),
    ("inner.name=c", "inner.name must be one of"),
    ("inner", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(Outer, None, [override])


@dataclass
class Window:
    first: int = 2
    last: int = 5

    def __post_init__(self):
        if self.first > self.last:
            raise ValueError(f"first ({self.first}) must not exceed last ({self.last})")


def test_values_that_go_together_are_checked_once_every_override_is_in():
    # each override alone would conflict with the other's default; together they fit, in either order
    assert cfg.load(Window, None, ["last=1", "first=0"]) == Window(0, 1)
    assert cfg.load(Window, None, ["first=7", "last=9"]) == Window(7, 9)
    with pytest.raises(cfg.ConfigConflict, match=r"first \(7\) must not exceed last \(5\)"):
        cfg.load(Window, None, ["first=7"])


def test_bad_file_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  stepz: 3\n")
    with pytest.raises(cfg.ConfigError, match="bad.yaml.*inner.stepz"):
        cfg.load(Outer, path)


def test_parse_args_out_shorthand():
    loaded = cfg.parse_args(Outer, ["--out", "elsewhere", "inner.steps=2"], job="outer")
    assert loaded.out == "elsewhere" and loaded.inner.steps == 2
    # overrides on both sides of a flag (plain parse_args refused the second: "unrecognized arguments")
    loaded = cfg.parse_args(Outer, ["inner.steps=3", "--out", "there", "inner.name=b"], job="outer")
    assert (loaded.out, loaded.inner.steps, loaded.inner.name) == ("there", 3, "b")


def test_print_config_prints_the_resolved_config_which_loads_back_unchanged(tmp_path, capsys, monkeypatch):
    (tmp_path / "presets" / "outer").mkdir(parents=True)
    (tmp_path / "presets" / "outer" / "smoke.yaml").write_text("inner:\n  steps: 1  # a comment\n")
    monkeypatch.setattr(cfg, "PRESETS", tmp_path / "presets")
    with pytest.raises(SystemExit) as exit_:
        cfg.parse_args(Outer, ["--preset", "smoke", "--print-config", "inner.name=b", "--out", "o"], job="outer")
    assert exit_.value.code == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert cfg.load(Outer, tmp_path / "printed.yaml") == Outer(inner=Inner(steps=1, name="b"), out="o")
