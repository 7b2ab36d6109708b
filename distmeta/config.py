"""Typed configs: dataclasses, loadable from YAML, overridable with `key.sub=value`.

Precedence, lowest first: the dataclass defaults, a named preset
(`configs/<job>/<name>.yaml`), `--config FILE.yaml`, then `key.sub=value`
overrides on the command line. Unknown keys and
values of the wrong type are errors that name the key and where it came from.
"""

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from distmeta.io import write_text


class ConfigError(ValueError):
    pass


class ConfigConflict(ConfigError):
    """Values that are each valid but do not go together (a dataclass's `__post_init__` said so)."""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def save(cfg, path) -> None:
    write_text(path, to_yaml(cfg))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become comma-joined strings (MLflow params, comparisons)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
    return out


def differences(old: dict, new: dict) -> list[str]:
    """Every dotted key whose value differs between two nested settings, as "key: old -> new"."""
    old, new = flatten(old), flatten(new)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """`a.b=3` -> {"a": {"b": 3}}; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not all(key.strip().split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return nested(key.strip(), yaml.safe_load(raw) if raw.strip() else "")


def nested(key: str, value) -> dict:
    """`("a.b", 3)` -> {"a": {"b": 3}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def from_dict(cls, data: dict, *, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from nested dicts, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {names}; {cls.__name__} has {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, where, prefix + name)
    default = cls()
    for name in fields:
        if name not in kwargs:
            kwargs[name] = getattr(default, name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's own check (__post_init__) of values that go together
        raise ConfigConflict(f"{where}: {err}") from None


def _coerce(tp, value, where, key):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {key} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        items = [_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


# The project's presets: configs/<job>/<name>.yaml (commented YAML a user can read and copy).
PRESETS = Path(__file__).resolve().parents[1] / "configs"


def presets(job: str) -> dict[str, Path]:
    """{preset name: its YAML file} for `job` (its folder under configs/)."""
    return {path.stem: path for path in sorted((PRESETS / job).glob("*.yaml"))}


def read_yaml(cls, path) -> dict:
    """A YAML config file as a nested dict, checked against `cls`; errors name the file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    from_dict(cls, loaded, where=str(path))  # names the file if a key is wrong
    return loaded


def load(cls, path=None, overrides=(), preset=None):
    """Defaults < preset (a YAML file) < YAML file `path` < overrides, checked against `cls`."""
    data = to_dict(cls())
    for source in (preset, path):
        if source is not None:
            data = merge(data, read_yaml(cls, source))
    for text in overrides:
        data = merge(data, parse_override(text))
        try:
            from_dict(cls, data, where=f"override {text!r}")
        except ConfigConflict:
            pass  # values that go together are checked once every override is in (a later one may fix it)
    return from_dict(cls, data)


def parse_args(cls, argv=None, *, job: str, description: str | None = None, epilog: str | None = None):
    """The job contract: `--config FILE.yaml`, `--preset NAME`, `--out DIR`, then `key.sub=value ...`;
    `--print-config` prints the resolved config as YAML (what the job would run with) and exits.

    `job` names the preset folder, configs/<job>/. `cls` must have an `out` field; `--out DIR` is
    shorthand for `out=DIR`. `epilog`: the job's own flags, which it handles before this, shown under --help.
    """
    found = presets(job)
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--config", type=Path, help="YAML file with config values")
    parser.add_argument("--preset", choices=sorted(found),
                        help=f"a preset from configs/{job}/ (smoke: minutes on 2 CPU cores; default.yaml lists every key)")
    parser.add_argument("--out", help="output directory (same as out=DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)  # key=value before, after and between the flags
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    try:
        config = load(cls, args.config, overrides, found.get(args.preset))
    except ConfigError as err:
        parser.error(str(err))
    if args.print_config:
        print(to_yaml(config), end="")
        raise SystemExit(0)
    return config


def resume_args(argv: list[str], job: str) -> list[str]:
    """`--resume DIR` = the run's own config and folder (`DIR/config.yaml`, `--out DIR`) with `resume=true`;
    other arguments follow as overrides."""
    if "--resume" not in argv:
        return argv
    at = argv.index("--resume")
    if at + 1 >= len(argv):
        raise SystemExit("--resume needs the output folder of the run to continue")
    folder = Path(argv[at + 1])
    if not (folder / "config.yaml").is_file():
        raise SystemExit(f"--resume {folder}: no config.yaml there (is it the --out folder of a {job} run?)")
    return ["--config", str(folder / "config.yaml"), "--out", str(folder)] + argv[:at] + argv[at + 2:] + ["resume=true"]


def check_resumable(cls, config, sections: tuple[str, ...]) -> None:
    """Refuse to resume the run in `config.out` when any of `sections` (what its models and checkpoints depend
    on) changed from the run's own config.yaml, naming every differing key."""
    saved_path = Path(config.out) / "config.yaml"
    if not saved_path.is_file():
        return  # nothing ran there yet: a fresh start
    saved, now = read_yaml(cls, saved_path), dataclasses.asdict(config)
    changed = differences({k: saved.get(k, {}) for k in sections}, {k: now[k] for k in sections})
    if changed:
        raise SystemExit(f"--resume {config.out}: the run was made with other settings than these:\n  "
                         + "\n  ".join(changed) + "\nresume with the run's own settings, or start a new --out folder")
