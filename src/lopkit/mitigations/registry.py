"""Name -> mitigation factory, and parsing of method specs such as ``cbp:replacement_rate=1e-4,l2init``."""

from __future__ import annotations

import importlib
from typing import Callable

from lopkit.configs import ConfigError, build_config, parse_overrides
from lopkit.mitigations.base import Mitigation, compose

METHODS: dict[str, type[Mitigation]] = {}
# modules that define methods; imported lazily so that a missing optional module never breaks the others
METHOD_MODULES = ["lopkit.mitigations.regularizers", "lopkit.mitigations.perturbation",
                  "lopkit.mitigations.resets", "lopkit.mitigations.architecture"]
NO_OP_NAMES = {"sgd", "none", "baseline", "adam"}


def register_method(cls: type[Mitigation]) -> type[Mitigation]:
    """Class decorator: register a Mitigation whose ``Config`` dataclass holds its validated hyper-parameters."""
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def available_methods() -> list[str]:
    """Registered method names (plus the no-op baseline names)."""
    _load_all()
    return sorted(METHODS) + sorted(NO_OP_NAMES)


def get_method(name: str, params: dict[str, str] | None = None) -> Mitigation | None:
    """Build one method from its name and ``key=value`` hyper-parameters (validated); None for a no-op baseline."""
    _load_all()
    name = name.strip().lower()
    if name in NO_OP_NAMES:
        if params:
            raise ConfigError(f"method {name!r} takes no hyper-parameters, got {', '.join(params)}")
        return None
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    cls = METHODS[name]
    config = build_config(cls.Config, params or {})
    return cls(config)


def parse_method_spec(spec: str | None) -> list[tuple[str, dict[str, str]]]:
    """``"cbp:replacement_rate=1e-4:maturity=100,l2init"`` -> ``[("cbp", {...}), ("l2init", {})]``."""
    result = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, *pairs = part.split(":")
        result.append((name.strip().lower(), parse_overrides(pairs)))
    return result


def build_methods(spec: str | None) -> Mitigation:
    """One composed Mitigation from a spec string (a no-op if the spec names only baselines)."""
    methods = [m for m in (get_method(name, params) for name, params in parse_method_spec(spec)) if m is not None]
    return compose(methods)


MethodFactory = Callable[..., Mitigation]
