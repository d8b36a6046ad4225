"""Layout-independent partitions of a cloned network's units into clone blocks.

A :class:`Partition` maps the name of a module (as in ``model.named_modules()``) to a
``LongTensor`` with one entry per output unit of that module: the *block id* of the unit,
which is the index of the base-network unit it copies.  Units are output features for
``(N, D)`` tensors and channels for ``(N, C, *spatial)`` tensors; for the modules named in
``channels_last`` (token-wise layers of a transformer, ``(N, T, D)``) the units are the last
axis and tokens count as samples.  Input features and final
outputs are never cloned, so they never appear in a partition (they are singleton blocks).

Everything downstream (cloning R^2, equitability residuals, equitable perturbations) is
driven by the block ids only, so it works the same for the interleaved layout
(clone ``j`` of base unit ``k`` at index ``k * E + j``), the tiled layout (index
``j * K + k``) or any permutation of units.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

__all__ = ["Partition", "validate_block_ids", "interleaved_block_ids", "tiled_block_ids"]


def validate_block_ids(block_ids: torch.Tensor, name: str = "block_ids") -> torch.Tensor:
    """Check that ``block_ids`` is a 1-D integer tensor whose ids cover ``0..k-1``; return it as int64 on CPU."""
    if not isinstance(block_ids, torch.Tensor):
        block_ids = torch.as_tensor(block_ids)
    if block_ids.dim() != 1:
        raise ValueError(
            f"{name}: block ids must be a 1-D tensor with one id per unit, got shape {tuple(block_ids.shape)}"
        )
    if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or block_ids.dtype == torch.bool:
        raise ValueError(f"{name}: block ids must be integers, got dtype {block_ids.dtype}")
    ids = block_ids.detach().to(device="cpu", dtype=torch.long).clone()
    if ids.numel() == 0:
        raise ValueError(f"{name}: block ids are empty; a partitioned module needs at least one unit")
    if int(ids.min()) < 0:
        raise ValueError(f"{name}: block ids must be >= 0, got minimum {int(ids.min())}")
    num_blocks = int(ids.max()) + 1
    sizes = torch.bincount(ids, minlength=num_blocks)
    missing = torch.nonzero(sizes == 0).flatten()
    if missing.numel() > 0:
        raise ValueError(
            f"{name}: block ids must cover every id 0..{num_blocks - 1} (one block per base unit); "
            f"ids {missing[:10].tolist()} have no units. Relabel the blocks to consecutive ids."
        )
    return ids


def interleaved_block_ids(base_units: int, factor: int) -> torch.Tensor:
    """Block ids of the interleaved layout: clone ``j`` of base unit ``k`` sits at index ``k * factor + j``."""
    _check_positive_int(base_units, "base_units")
    _check_positive_int(factor, "factor")
    return torch.arange(base_units, dtype=torch.long).repeat_interleave(factor)


def tiled_block_ids(base_units: int, factor: int) -> torch.Tensor:
    """Block ids of the tiled layout: clone ``j`` of base unit ``k`` sits at index ``j * base_units + k``."""
    _check_positive_int(base_units, "base_units")
    _check_positive_int(factor, "factor")
    return torch.arange(base_units, dtype=torch.long).repeat(factor)


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, eq=False)
class Partition(Mapping[str, torch.Tensor]):
    """Module name -> block id of each output unit (block id = base unit index); drives all cloning checks.

    ``factor`` is the common block size when every block of every module has the same size
    (as produced by :func:`lopkit.theory.cloning.clone`); it is ``None`` for irregular partitions
    unless given explicitly.  ``channels_last`` names the modules whose units sit on the last axis
    (``(N, T, D)`` token-wise outputs); all others have units on axis 1.  The stored tensors are
    private copies; treat them as read-only.
    """

    blocks: Mapping[str, torch.Tensor]
    factor: int | None = None
    channels_last: frozenset[str] = frozenset()
    _sizes: Mapping[str, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, Mapping):
            raise ValueError(f"Partition needs a mapping of module name -> block ids, got {type(self.blocks).__name__}")
        checked: dict[str, torch.Tensor] = {}
        sizes: dict[str, torch.Tensor] = {}
        for name, ids in self.blocks.items():
            if not isinstance(name, str):
                raise ValueError(f"Partition keys must be module names (str), got {name!r}")
            checked[name] = validate_block_ids(ids, name=f"partition[{name!r}]")
            sizes[name] = torch.bincount(checked[name])
        last = frozenset(self.channels_last)
        unknown = sorted(last - set(checked))
        if unknown:
            raise ValueError(f"Partition channels_last names {unknown} that have no block ids")
        object.__setattr__(self, "channels_last", last)
        object.__setattr__(self, "blocks", MappingProxyType(checked))
        object.__setattr__(self, "_sizes", MappingProxyType(sizes))
        uniform = _uniform_block_size(sizes.values())
        if self.factor is None:
            object.__setattr__(self, "factor", uniform)
        else:
            _check_positive_int(self.factor, "factor")
            if sizes and uniform != self.factor:
                raise ValueError(
                    f"factor={self.factor} but the block sizes are not all equal to it "
                    f"(common size: {uniform}); pass factor=None for irregular partitions"
                )

    # Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            self.factor == other.factor
            and self.channels_last == other.channels_last
            and list(self.blocks) == list(other.blocks)
            and all(torch.equal(self.blocks[k], other.blocks[k]) for k in self.blocks)
        )

    def __hash__(self) -> int:
        return hash((self.factor, tuple((k, tuple(v.tolist())) for k, v in self.blocks.items())))

    def __reduce__(self):
        # MappingProxyType cannot be pickled; rebuild from plain dicts (pickle, deepcopy, torch.save)
        return (type(self), (dict(self.blocks), self.factor, self.channels_last))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {self.base_units(k)}x{self.factor or '?'}" for k in self.blocks)
        return f"Partition(factor={self.factor}, {{{inner}}})"

    # Queries ------------------------------------------------------------------------------
    def base_units(self, name: str) -> int:
        """Number of blocks (= base-network units) of module ``name``."""
        return int(self._sizes[self._known(name)].numel())

    def block_sizes(self, name: str) -> torch.Tensor:
        """LongTensor ``(base_units,)`` with the number of clones of each base unit of module ``name``."""
        return self._sizes[self._known(name)].clone()

    def members(self, name: str) -> list[torch.Tensor]:
        """Indices of the units in each block of module ``name`` (list indexed by block id)."""
        ids = self.blocks[self._known(name)]
        return [torch.nonzero(ids == k).flatten() for k in range(self.base_units(name))]

    def restrict(self, names: list[str] | tuple[str, ...]) -> Partition:
        """Sub-partition with only the given module names."""
        return Partition({n: self.blocks[self._known(n)] for n in names}, factor=None,
                         channels_last=self.channels_last & set(names))

    def units_last(self, name: str) -> bool:
        """True when module ``name``'s units are on the last axis (token-wise ``(N, T, D)`` outputs)."""
        return self._known(name) in self.channels_last

    def _known(self, name: str) -> str:
        if name not in self.blocks:
            raise KeyError(f"module {name!r} is not in the partition; known modules: {list(self.blocks)}")
        return name

    # Constructors -------------------------------------------------------------------------
    @classmethod
    def interleaved(cls, names_to_base_units: Mapping[str, int], factor: int) -> Partition:
        """Partition where clone ``j`` of base unit ``k`` is unit ``k * factor + j`` in every named module."""
        return cls({n: interleaved_block_ids(k, factor) for n, k in names_to_base_units.items()}, factor=factor)

    @classmethod
    def tiled(cls, names_to_base_units: Mapping[str, int], factor: int) -> Partition:
        """Partition where clone ``j`` of base unit ``k`` is unit ``j * base_units + k`` in every named module."""
        return cls({n: tiled_block_ids(k, factor) for n, k in names_to_base_units.items()}, factor=factor)


def _uniform_block_size(all_sizes) -> int | None:
    """The block size shared by every block of every module, or ``None`` if sizes differ or there are none."""
    common: int | None = None
    for sizes in all_sizes:
        lo, hi = int(sizes.min()), int(sizes.max())
        if lo != hi or (common is not None and lo != common):
            return None
        common = lo
    return common
