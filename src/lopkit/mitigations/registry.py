"""Name -> mitigation factory, and the one grammar of method specs, e.g. ``cbp:replacement_rate=1e-4,l2init``.

Grammar (shared by ``lopkit run --method``, ``lopkit compare --methods``, sweep files and the seed systems):
a spec is ``name[:key=value[:key=value...]]``; ``,`` or ``+`` separate methods that are composed in order
(a ``+`` inside a number's exponent such as ``1e+4`` does not); names are case-insensitive and
:data:`METHOD_ALIASES` maps common short names (``snp`` -> ``shrink_perturb``) to registered ones.
(``lopkit compare --methods`` uses ``,`` between the methods it compares and ``+`` inside one of them.)
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Iterable

from lopkit.configs import ConfigError, build_config, parse_overrides
from lopkit.mitigations.base import Mitigation, compose

METHODS: dict[str, type[Mitigation]] = {}
# modules that define methods; imported lazily so that a missing optional module never breaks the others
METHOD_MODULES = ["lopkit.mitigations.regularizers", "lopkit.mitigations.perturbation",
                  "lopkit.mitigations.resets", "lopkit.mitigations.architecture",
                  "lopkit.mitigations.field", "lopkit.mitigations.field2"]
NO_OP_NAMES = {"sgd", "none", "baseline", "adam"}

#: Short or alternative method names, mapped to registered names (resolved everywhere a spec is parsed).
METHOD_ALIASES: dict[str, str] = {
    "snp": "shrink_perturb",
    "s&p": "shrink_perturb",
    "shrink_and_perturb": "shrink_perturb",
    "shrinkperturb": "shrink_perturb",
    "l2_init": "l2init",
    "ln": "layernorm",
    "layer_norm": "layernorm",
    "bn": "batchnorm",
    "batch_norm": "batchnorm",
    "noisy": "noisy_sgd",
    "noisysgd": "noisy_sgd",
    "continual_backprop": "cbp",
    "weight_decay": "l2",
    "properadam": "proper_adam",
    "parseval_reg": "parseval",
    "spectral_reg": "spectral",
    "head_reset": "reset",
    "hare_and_tortoise": "hare_tortoise",
    "hat": "hare_tortoise",
    "infer_heads": "infer",
    "c_chain": "cchain",
    "c-chain": "cchain",
    "plasticity_injection": "injection",
    "re_grama": "regrama",
    "self_normalized_resets": "snr",
    "direction_aware_shrinking": "dash",
    "selective_weight_reinit": "swr",
    "continuous_cbp": "ccbp",
    "reset_optimizer": "optimizer_reset",
    "leakyrelu": "leaky_relu",
}

# ',' or '+' separate methods; a '+' inside a number's exponent (1e+4) does not
_METHOD_SEPARATOR = re.compile(r",|(?<![0-9][eE])\+")


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


def canonical_name(name: str) -> str:
    """``" SNP "`` -> ``"shrink_perturb"``: lower-cased, stripped, alias resolved (unknown names pass through)."""
    name = name.strip().lower()
    return METHOD_ALIASES.get(name, name)


def canonical_spec(spec: str) -> str:
    """``"SNP:sigma=0.1"`` -> ``"shrink_perturb:sigma=0.1"`` (name canonical, hyper-parameters kept as written)."""
    name, *pairs = spec.strip().split(":")
    return ":".join([canonical_name(name), *(p.strip() for p in pairs)])


def split_method_specs(names: str | Iterable[str] | None) -> list[str]:
    """``["cbp:replacement_rate=1e-4,l2init", "snp"]`` -> ``["cbp:replacement_rate=1e-4", "l2init", "shrink_perturb"]``.

    One canonical spec per method (``,`` and ``+`` separate methods; aliases resolved); ConfigError for a
    non-string item. Not validated against the registry (:func:`get_method` does that).
    """
    if names is None:
        return []
    items = [names] if isinstance(names, str) else list(names)
    specs = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"method names must be strings, got {item!r}")
        specs += [canonical_spec(part) for part in _METHOD_SEPARATOR.split(item) if part.strip()]
    return specs


def available_methods() -> list[str]:
    """Registered method names (plus the no-op baseline names)."""
    _load_all()
    return sorted(METHODS) + sorted(NO_OP_NAMES)


def get_method(name: str, params: dict[str, str] | None = None) -> Mitigation | None:
    """Build one method from its name and ``key=value`` hyper-parameters (validated); None for a no-op baseline."""
    _load_all()
    name = canonical_name(name)
    if name in NO_OP_NAMES:
        if params:
            raise ConfigError(f"method {name!r} takes no hyper-parameters, got {', '.join(params)}")
        return None
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    cls = METHODS[name]
    config = build_config(cls.Config, params or {})
    return cls(config)


def parse_method_spec(spec: str | Iterable[str] | None) -> list[tuple[str, dict[str, str]]]:
    """``"cbp:replacement_rate=1e-4:maturity=100,snp"`` -> ``[("cbp", {...}), ("shrink_perturb", {})]``."""
    result = []
    for part in split_method_specs(spec):
        name, *pairs = part.split(":")
        result.append((name, parse_overrides(pairs)))
    return result


def build_methods(spec: str | Iterable[str] | None) -> Mitigation:
    """One composed Mitigation from a spec string (a no-op if the spec names only baselines)."""
    methods = [m for m in (get_method(name, params) for name, params in parse_method_spec(spec)) if m is not None]
    return compose(methods)


MethodFactory = Callable[..., Mitigation]
