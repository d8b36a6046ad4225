"""Exceptions raised by the offline dataset loaders."""

from __future__ import annotations

__all__ = ["DatasetNotFoundError", "IdxFormatError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk; the message says how to install or point to them."""


class IdxFormatError(ValueError):
    """A file is not a valid IDX file (bad magic number, unknown dtype, truncated or padded data)."""
