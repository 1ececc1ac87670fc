"""``--key=value`` overrides for the package's configuration dataclasses (nanoGPT style).

Values are parsed by the field's declared type; an unknown key or an unparsable value is an
error that names the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path


def _parse(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}={value}: expected true or false")
    if origin is tuple:
        parts = value.split(",")
        args = typing.get_args(typ)
        if len(parts) != len(args):
            raise ValueError(f"--{key}={value}: expected {len(args)} comma-separated values")
        return tuple(_parse(p, a, key) for p, a in zip(parts, args))
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"--{key}={value}: expected {typ.__name__}") from None
    if origin is typing.Union or origin is types.UnionType:  # e.g. int | None
        if value.lower() in ("none", "null", ""):
            return None
        return _parse(value, next(a for a in typing.get_args(typ) if a is not type(None)), key)
    raise ValueError(f"--{key}: fields of type {typ} cannot be set from the command line")


def apply_overrides(obj, overrides: list[str]):
    """A copy of dataclass ``obj`` with ``key=value`` items applied (``a.b=...`` for nested)."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected --key=value")
        key, value = item.split("=", 1)
        obj = _set(obj, key.split("."), value, key)
    return obj


def _set(obj, path: list[str], value: str, key: str):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if path[0] not in names:
        raise ValueError(f"unknown config key {key!r}; known keys of {type(obj).__name__}: "
                         f"{', '.join(names)}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown config key {key!r}: {path[0]} has no sub-keys")
        new = _set(current, path[1:], value, key)
    elif dataclasses.is_dataclass(current):
        raise ValueError(f"config key {key!r} is a group; set one of its fields, e.g. "
                         f"{key}.{dataclasses.fields(current)[0].name}=...")
    else:
        new = _parse(value, hints[path[0]], key)
    return dataclasses.replace(obj, **{path[0]: new})


def as_json(cfg) -> dict:
    """A config as its ``config.json`` holds it (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_changes(have: dict, cfg) -> dict[str, tuple]:
    """``{dotted key: (stored value, value in cfg)}`` where a stored config (a
    ``config.json``'s ``train``) differs from the dataclass ``cfg``.

    A key the stored config lacks counts as its default (``type(cfg)()``), so a new option
    whose default keeps the old behaviour does not make older runs (or records) stale.
    """
    have, want = _flat(_with_defaults(have, as_json(type(cfg)()))), _flat(as_json(cfg))
    return {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)}


def check_resumable(run, section: str, cfg, runtime_keys, new_run_flag: str) -> None:
    """Refuse to resume the run in folder ``run`` with a config other than its ``config.json``.

    A resumed run with other settings would end as neither run, under a ``config.json`` that no
    longer describes it, so any difference outside ``runtime_keys`` (threads, devices, logging)
    is an error naming each differing key; ``section`` is the file's key for the config
    (``train``, ``pretrain``) and ``new_run_flag`` the command-line option that starts afresh.
    """
    changes = {k: v for k, v in config_changes(saved_config(run, section), cfg).items()
               if k not in runtime_keys}
    if changes:
        said = ", ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in changes.items())
        raise ValueError(f"{run}: --resume with other settings than {Path(run) / 'config.json'} "
                         f"({said}); resume with the run's settings, or start a new "
                         f"{new_run_flag}")


def saved_config(run, section: str) -> dict:
    """The config a run folder's ``config.json`` holds under ``section``; an unreadable file
    is an error naming it."""
    cfg_path = Path(run) / "config.json"
    try:
        return json.loads(cfg_path.read_text())[section]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: cannot read the run's config ({e}); without it the run "
                         f"cannot be resumed or reused") from None


def config_diff(have: dict, cfg) -> list[str]:
    """The keys of :func:`config_changes`, sorted."""
    return list(config_changes(have, cfg))


def _with_defaults(have: dict, defaults: dict) -> dict:
    out = dict(defaults)
    for k, v in have.items():
        out[k] = _with_defaults(v, defaults[k]) if isinstance(defaults.get(k), dict) else v
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
