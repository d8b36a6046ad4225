"""Debian ``fortunes``: loading, stable fortune keys and the cloze cut."""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from lopkit.data.errors import DatasetNotFoundError
from lopkit.moe.data.text import (
    DEFAULT_FORTUNES_DIR,
    FORTUNES_INSTALL_HINT,
    FORTUNE_CLOZE_CHARS,
    normalize_text,
)

# ----------------------------------------------------------------------------------------------------------------
# fortunes


def fortune_key(text: str) -> str:
    """Stable id of a fortune: SHA-1 of its whitespace-normalised text."""
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def _load_fortunes_cached(directory: str, stamp: tuple) -> tuple[str, ...]:
    """Read and split all fortune files of a folder; duplicates removed (first kept)."""
    seen: set[str] = set()
    fortunes: list[str] = []
    for name in sorted(os.listdir(directory)):
        path = Path(directory) / name
        if name.endswith((".dat", ".u8")) or name.startswith(".") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        for part in re.split(r"(?m)^%\s*$", text):
            fortune = part.strip("\n").rstrip()
            if not fortune.strip():
                continue
            key = fortune_key(fortune)
            if key not in seen:
                seen.add(key)
                fortunes.append(fortune)
    return tuple(fortunes)


def load_fortunes(directory: str | os.PathLike[str] = DEFAULT_FORTUNES_DIR) -> list[str]:
    """All fortunes of a fortune folder (the ``off/`` subfolder, ``.dat`` and ``.u8`` files are skipped).

    Raises DatasetNotFoundError naming the ``fortunes`` package when the folder has no fortune files.
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"fortune folder {folder} not found. {FORTUNES_INSTALL_HINT}")
    stamp = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )
    fortunes = _load_fortunes_cached(str(folder.resolve()), stamp)
    if not fortunes:
        raise DatasetNotFoundError(f"no fortunes found in {folder}. {FORTUNES_INSTALL_HINT}")
    return list(fortunes)


def _cloze_parts(fortune: str) -> tuple[str, str] | None:
    """(context, answer with leading space) of a fortune cut at the word boundary nearest its middle."""
    text = normalize_text(fortune)
    if not (FORTUNE_CLOZE_CHARS[0] <= len(text) <= FORTUNE_CLOZE_CHARS[1]) or not text.isascii():
        return None
    spaces = [i for i, c in enumerate(text) if c == " "]
    if len(spaces) < 3:
        return None
    cut = min(spaces, key=lambda i: (abs(i - len(text) / 2), i))
    return text[:cut], text[cut:]
