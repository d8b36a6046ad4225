"""Seed derivation shared by the data streams; re-exports the one seeding helper :mod:`lopkit.seeding`."""

from __future__ import annotations

from lopkit.seeding import derive_seed, seeded_generator, stable_key

__all__ = ["derive_seed", "seeded_generator", "stable_key"]
