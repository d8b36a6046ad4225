"""Split keys and small text helpers shared by the MoE-PHDS data modules (constants, splits, bytes)."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import torch


DEFAULT_GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")
GCIDE_INSTALL_HINT = "Install it with `sudo apt-get install dict-gcide` (Debian/Ubuntu)."
FORTUNES_INSTALL_HINT = "Install it with `sudo apt-get install fortunes` (Debian/Ubuntu)."
PARSER_VERSION = 3

SPLITS = ("train", "val", "test")
SPLIT_PERMILLE = (800, 900)  # bucket < 800 -> train, < 900 -> val, else test
MC_DOMAINS = ("arithmetic", "reversal", "definition", "fortune_cloze")
GENERATED_DOMAINS = ("arithmetic", "reversal", "copy", "kv", "dyck")
ARITHMETIC_MAX = 99  # operands of "a+b = c" are 0..ARITHMETIC_MAX
ARITHMETIC_OFFSETS = (-33, -22, -11, 11, 22, 33)  # distractor offsets: units and tens digits differ
DEFINITION_VOCAB = 3000  # words whose definitions are the definition domain's facts (all of them in pretraining)
FORTUNE_POOL = 3000  # cloze-able fortunes that are the fortune_cloze domain's facts (all of them in pretraining)
REVERSAL_LENGTHS = (5, 8)  # inclusive range of string lengths for reversal/copy
FORTUNE_CLOZE_CHARS = (30, 120)  # inclusive length range of fortunes used for cloze items
DEFINITION_CHARS = (15, 90)  # inclusive length range of definitions used for MC items
N_CHOICES = 4

_DICTD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICTD_VALUE = {char: value for value, char in enumerate(_DICTD_ALPHABET)}


# ----------------------------------------------------------------------------------------------------------------
# splits and small helpers


def key_split(namespace: str, key: str) -> str:
    """Deterministic split ('train'/'val'/'test', 80/10/10) of an item key; independent of any seed."""
    digest = hashlib.blake2b(f"{namespace}|{key}".encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 1000
    if bucket < SPLIT_PERMILLE[0]:
        return "train"
    return "val" if bucket < SPLIT_PERMILLE[1] else "test"


def _check_split(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split


def normalize_text(text: str) -> str:
    """Collapse all whitespace runs to single spaces and strip the ends."""
    return " ".join(text.split())


def _ascii_fold(text: str) -> str:
    """Fold accents to ASCII (NFKD) and drop what has no ASCII form."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def text_to_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a LongTensor of token ids 0..255."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
