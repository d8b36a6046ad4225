"""Lazy package attributes (PEP 562): a package's public names and sub-modules load on first access.

Used by ``lopkit``, ``lopkit.moe`` and ``lopkit.kws`` so that importing a package (and so ``lopkit --help``) loads
neither torch nor pandas until a name that needs them is touched. No imports here: ``import lopkit`` stays fast.
"""


def lazy_attributes(package: str, exports: dict[str, str], namespace: dict) -> tuple:
    """``(__getattr__, __dir__)`` for ``package``: names in ``exports`` (name -> defining module) and sub-modules."""

    def __getattr__(name: str) -> object:
        """Import the module defining ``name`` (or the sub-module ``package.name``) and cache the result."""
        import importlib

        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif name.startswith("__"):  # dunder probes (copy, pickle, doctest) are never sub-modules
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise  # the sub-module exists but one of its own imports is missing: say that
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        """The public names (loaded or not) plus what the package holds so far, without private helpers."""
        return sorted(set(exports) | {name for name in namespace if not name.startswith("_") or name.startswith("__")}
                      - {"TYPE_CHECKING", "lazy_attributes"})

    return __getattr__, __dir__
