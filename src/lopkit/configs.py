"""Typed configs: build a dataclass config from presets and ``key=value`` overrides, validated at the door."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config is invalid: unknown key, wrong type or impossible value. The message says which and how to fix it."""


def config_field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of every init field of the config dataclass ``cls``, by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _parse_scalar(text: str, kind: Any, key: str) -> Any:
    """Parse one string value into ``kind`` (bool, int, float, str, or Optional/Union/tuple/list of those)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if type(None) in options and text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse_scalar(text, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin in (tuple, list):
        (item_kind, *_rest) = typing.get_args(kind) or (str,)
        parts = [p for p in text.strip("[]() ").split(",") if p.strip()]
        values = [_parse_scalar(p.strip(), item_kind, key) for p in parts]
        return tuple(values) if origin is tuple else values
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if kind is str:
        return text
    if typing.get_origin(kind) is typing.Literal:
        allowed = typing.get_args(kind)
        if text not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {text!r}")
        return text
    raise ConfigError(f"{key}: values of type {kind} cannot be set from the command line")


def coerce_value(value: Any, kind: Any, key: str) -> Any:
    """Check (and gently convert) a Python value given in a preset or dict against the field type."""
    if isinstance(value, str) and kind is not str:
        return _parse_scalar(value, kind, key)
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, bool, str) and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        (item_kind, *_rest) = typing.get_args(kind) or (Any,)
        items = [value_i if item_kind is Any else coerce_value(value_i, item_kind, key) for value_i in value]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal and value not in typing.get_args(kind):
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, typing.get_args(kind)))}; got {value!r}")
    return value


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """Turn ``["lr=0.01", "width=50"]`` into a dict; a malformed pair is a ConfigError."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip()] = value.strip()
    return result


#: Fields of the ``optim`` group of dotted keys (``optim.lr=0.01``): dotted name -> flat config field.
OPTIM_GROUP: dict[str, str] = {
    "name": "optimizer", "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "warmup_steps": "warmup_steps", "warmup_fraction": "warmup_fraction",
    "min_lr_ratio": "min_lr_ratio", "reset": "reset_optimizer",
}  # fmt: skip


def nested_keys(cls: type) -> dict[str, str]:
    """Every dotted key of config dataclass ``cls`` and the flat field it sets (``monitor.every`` -> ``monitor_every``).

    Groups: ``monitor.*`` (the ``monitor_*`` fields, and ``monitor.enabled`` for a ``monitor`` switch),
    ``optim.*`` (:data:`OPTIM_GROUP`, where the config has the field) and the class's own ``NESTED_KEYS``.
    """
    fields = config_field_types(cls)
    keys: dict[str, str] = {}
    if fields.get("monitor") is bool:
        keys["monitor.enabled"] = "monitor"
    keys.update({f"monitor.{name[len('monitor_'):]}": name for name in fields if name.startswith("monitor_")})
    keys.update({f"optim.{name}": field for name, field in OPTIM_GROUP.items() if field in fields})
    keys.update(getattr(cls, "NESTED_KEYS", None) or {})
    return keys


def _close_matches(key: str, names: list[str]) -> list[str]:
    """Names that contain ``key`` or are contained in it (case-insensitive): the "did you mean" hint."""
    return [name for name in names if key.lower() in name.lower() or name.lower() in key.lower()]


def resolve_key(cls: type, key: str) -> str:
    """The flat field of config ``cls`` that ``key`` (flat or dotted) sets; ConfigError with a hint if none."""
    fields = config_field_types(cls)
    if key in fields:
        return key
    nested = nested_keys(cls)
    if key in nested:
        return nested[key]
    if "." in key:
        group, _, name = key.partition(".")
        in_group = sorted(k for k in nested if k.startswith(group + "."))
        if not in_group:
            groups = sorted({k.partition(".")[0] for k in nested})
            valid = f"its groups are {', '.join(groups)}" if groups else "it takes flat keys only"
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}: no group {group!r}; {valid} "
                              f"(or flat keys: {', '.join(sorted(fields))})")
        names = [k.partition(".")[2] for k in in_group]
        close = _close_matches(name, names) or difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(f'{group}.{c}' for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key {key!r} for {cls.__name__}.{hint} Valid {group}.* keys: "
                          f"{', '.join(in_group)}")
    close = _close_matches(key, list(fields))
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} for {cls.__name__}.{hint} Valid keys: {', '.join(sorted(fields))}")


def build_config(cls: type, *layers: Mapping[str, Any]) -> Any:
    """Instantiate dataclass ``cls`` from dict layers (later wins), rejecting unknown keys and wrong types.

    Keys are field names or dotted keys of a group (``monitor.every``, ``optim.lr``: :func:`nested_keys`);
    one layer may not set a field twice. The dataclass may define ``validate(self)`` raising ConfigError for
    impossible values; it is called here.
    """
    fields = config_field_types(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        given: dict[str, str] = {}  # field -> the key of this layer that set it
        for key, value in (layer or {}).items():
            field = resolve_key(cls, key)
            if field in given:
                raise ConfigError(f"{given[field]} and {key} both set {cls.__name__}.{field}; give only one of them")
            given[field] = key
            values[field] = coerce_value(value, fields[field], key)
    try:
        config = cls(**values)
    except TypeError as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def run_identity(config: Any, config_cls: type | None = None) -> dict[str, Any]:
    """The part of a config a run id hashes: every field, except a ``run_id_neutral`` one at its default.

    A config class lists in ``run_id_neutral`` the fields added after runs had been stored whose default does what
    those runs did; leaving them out while they hold that default keeps the ids of stores written before the field
    existed (they then resume and skip instead of rerunning). A non-default value is part of the id as usual.
    ``config`` is a typed config, or its dict (as stored) together with ``config_cls``.
    """
    if isinstance(config, Mapping):
        if config_cls is None:
            raise TypeError("run_identity of a config dict needs its config class")
        values = json.loads(json.dumps(dict(config)))
    else:
        config_cls, values = type(config), config_to_dict(config)
    for name, default in neutral_defaults(config_cls).items():
        if name in values and values[name] == default:
            del values[name]
    return values


def neutral_defaults(config_cls: type) -> dict[str, Any]:
    """The defaults of a config class's ``run_id_neutral`` fields, in their stored (JSON) form."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}
    return {name: json.loads(json.dumps(defaults[name]))
            for name in getattr(config_cls, "run_id_neutral", ()) if name in defaults}


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds; used in configs' ``validate`` methods."""
    if not condition:
        raise ConfigError(message)


#: Values a benchmark's ``device`` setting accepts (``cuda:N`` picks one of several GPUs).
DEVICES: tuple[str, ...] = ("cpu", "cuda")


def check_device(value: Any, key: str = "device", supported: tuple[str, ...] = DEVICES) -> Any:
    """The ``torch.device`` of a ``device`` setting; ConfigError for a bad name, an unsupported kind or no CUDA.

    ``supported`` lists the device kinds the caller can run on (e.g. ``("cpu",)`` for a CPU-only benchmark).
    """
    import torch

    text = str(value).strip().lower() if isinstance(value, (str, torch.device)) else None
    kind, _, index = (text or "").partition(":")
    if kind not in DEVICES or (index and not index.isdigit()):
        raise ConfigError(f"{key} must be 'cpu' or 'cuda' (or 'cuda:N' for GPU N), got {value!r}")
    if kind not in supported:
        raise ConfigError(f"{key}={text} is not supported here (it runs on: {', '.join(supported)}); "
                          f"use {key}={supported[0]}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{key}={text} was asked for but {why}; use {key}=cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{key}={text} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device(text)
