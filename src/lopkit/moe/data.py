"""Offline byte-level text for the MoE-PHDS reproduction: GCIDE, fortunes, generated domains, MC items, SFT batches.

Everything is byte level: a text becomes its UTF-8 bytes (token ids 0..255). Items are kept (almost) ASCII.

Sources (Debian packages, nothing is downloaded):

* ``dict-gcide``: ``/usr/share/dictd/gcide.dict.dz`` (gzip/dictzip) + ``gcide.index`` (dictd index lines
  ``word<TAB>offset<TAB>length`` with offset/length in dictd base64, alphabet ``A-Za-z0-9+/``, most significant
  digit first). :func:`load_gcide` cleans the markup (accent codes such as ``[a^]`` -> ``a``, pronunciations
  ``\\Ap"ple\\``, etymologies and labels in ``[...]`` and the braces of ``{cross references}``, ``<tags>``) and
  keeps the first sense as :attr:`GcideEntry.definition` plus the whole cleaned entry as :attr:`GcideEntry.text`.
  Parsed entries are cached in-process (``functools.lru_cache``) and on disk (a pickle under
  ``$LOPKIT_CACHE_DIR`` or ``~/.cache/lopkit``, keyed by the files' size and mtime and the parser version).
* ``fortunes``: ``/usr/share/games/fortunes/*`` (entries separated by lines holding ``%``; the ``.dat`` index
  files, the ``.u8`` symlinks and the offensive ``off/`` folder are skipped).

Splits. Every item has an underlying *key* (the lower-case word, the arithmetic operands ``a+b mod p``, the
source string of a reversal, the SHA-1 of a whitespace-normalised fortune). :func:`key_split` hashes the key
(BLAKE2b, independent of any seed) into train/val/test with fractions 0.8/0.1/0.1, so the splits are disjoint
by construction and stable across runs; the pretraining corpus only ever draws train keys.

Multiple-choice formats (score each choice by log P(choice | context); ``context + choice`` is exactly the
surface form of the pretraining line for the correct choice; choices start with a space):

* ``arithmetic``: context ``"37+58 mod 97 ="``, choices e.g. ``(" 93", " 95", " 1", " 96")`` with answer 1
  (``" 95"``); the distractors are the true value shifted by 3 distinct offsets in {-3..3}\\{0}, mod p
  (95+3 = 98 = 1 mod 97). Pretraining line: ``"37+58 mod 97 = 95"``.
* ``reversal``: context ``"reverse: stone ->"``, choices ``(" enots", " eonts", " stone", " tsone")`` -- the
  true reversal, a copy with two different characters swapped, the unreversed string and a rotation of the
  reversal. Pretraining line: ``"reverse: stone -> enots"``.
* ``definition``: context ``"Which definition fits zebra?"``, choices are 4 first-sense GCIDE definitions with a
  leading space, e.g. ``" Any member of three species of African wild horses ..."``; the 3 distractors come
  from other words of the same split, preferably of the same part of speech and similar length, and are never
  a definition of the asked word (homographs such as the several ``Bank`` entries are excluded).
  Pretraining lines: ``"Which definition fits zebra? Any member ..."`` and ``"zebra: Any member ..."``.
* ``fortune_cloze``: context = the first half of a short fortune (cut at the word boundary nearest the middle),
  choices = the true second half and the second halves of 3 other fortunes of the same split with similar
  length, e.g. context ``"A fool and his money"`` / choices ``(" are soon parted.", ...)``. Pretraining line:
  the whole whitespace-normalised fortune.

Pretraining corpus (:class:`PretrainCorpus`): a mixture of sources with the proportions of
:class:`PretrainCorpusConfig` (``mix_*`` fields, normalised to sum 1): cleaned GCIDE entries, fortunes (one per
line), definition lines, arithmetic, reversal, copy (``"copy: abc -> abc"``), key-value recall
(``"kv: a=3 k=7 x=1 ? k -> 7"``) and Dyck-bracket validity (``"dyck: ([]) -> valid"``). Each batch row is a
random window of ``context + 1`` bytes of one source, drawn with a ``torch.Generator`` (reproducible).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pickle
import random
import re
import time
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lopkit.configs import require
from lopkit.data.errors import DatasetNotFoundError

__all__ = [
    "DEFAULT_FORTUNES_DIR",
    "DEFAULT_GCIDE_DICT",
    "GENERATED_DOMAINS",
    "MC_DOMAINS",
    "SPLITS",
    "GcideEntry",
    "MCItem",
    "PretrainCorpus",
    "PretrainCorpusConfig",
    "arithmetic_line",
    "build_mc_items",
    "decode_dictd_base64",
    "dyck_line",
    "fortune_key",
    "gcide_blocks_by_split",
    "gcide_definitions_by_word",
    "key_split",
    "kv_line",
    "last_parse_stats",
    "load_fortunes",
    "load_gcide",
    "mc_pool_size",
    "normalize_text",
    "parse_dictd_index",
    "sft_batch",
    "text_to_tokens",
]

DEFAULT_GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
DEFAULT_FORTUNES_DIR = Path("/usr/share/games/fortunes")
GCIDE_INSTALL_HINT = "Install it with `sudo apt-get install dict-gcide` (Debian/Ubuntu)."
FORTUNES_INSTALL_HINT = "Install it with `sudo apt-get install fortunes` (Debian/Ubuntu)."
PARSER_VERSION = 3

SPLITS = ("train", "val", "test")
SPLIT_PERMILLE = (800, 900)  # bucket < 800 -> train, < 900 -> val, else test
MC_DOMAINS = ("arithmetic", "reversal", "definition", "fortune_cloze")
GENERATED_DOMAINS = ("arithmetic", "reversal", "copy", "kv", "dyck")
ARITHMETIC_MODULI = (97, 101, 103, 107)
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


# ----------------------------------------------------------------------------------------------------------------
# GCIDE (dictd) parsing


@dataclass(frozen=True)
class GcideEntry:
    """One GCIDE entry: index headword, part of speech, first-sense definition and the whole cleaned text."""

    word: str
    definition: str
    pos: str = ""
    text: str = ""
    block: int = 0  # id of the dictd block (several index words may share a block)
    headword: bool = True  # the word is a headword of its block (not a run-in phrase or inflection)


def decode_dictd_base64(text: str) -> int:
    """Decode a dictd index number (base64 digits A-Za-z0-9+/, most significant first)."""
    if not text:
        raise ValueError("empty dictd base64 number")
    value = 0
    for char in text:
        try:
            value = value * 64 + _DICTD_VALUE[char]
        except KeyError:
            raise ValueError(f"invalid dictd base64 digit {char!r} in {text!r}") from None
    return value


def parse_dictd_index(lines: Iterable[str]) -> list[tuple[str, int, int]]:
    """Parse dictd index lines into (word, offset, length); skips the ``00-database-*`` metadata entries."""
    rows = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"dictd index line {number} has {len(parts)} tab-separated fields, expected 3: {line!r}")
        word, offset, length = parts[0], parts[1], parts[2]
        if word.startswith("00-database") or word.startswith("00-gcide") or word.startswith("00-web1913"):
            continue
        rows.append((word, decode_dictd_base64(offset), decode_dictd_base64(length)))
    return rows


# accent and symbol codes of the GCIDE dictd text: [a^] [ae] ['e] [=o] [imac] [aum] [root] [deg] ...
_SPECIAL_CODES = {
    "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "ng": "ng", "th": "th", "eth": "th", "thorn": "th",
    "imac": "i", "aum": "a", "add": "a", "asl": "a", "udd": "u", "root": "", "deg": " deg", "sect": "section",
    "yogh": "y", "dsdot": "d", "bprime": "b'", "pounds": "pounds", "flat": "flat", "sharp": "sharp",
    "break": "", "bar": "", "alpha": "alpha", "beta": "beta", "gamma": "gamma", "delta": "delta",
    "Delta": "Delta", "theta": "theta", "iota": "iota", "tau": "tau", "phi": "phi", "pi": "pi",
}  # fmt: skip
_CODE_RE = re.compile(r"\[([^\[\]\s]{1,6})\]")
_LETTER_CODE_RE = re.compile(r"^[^A-Za-z0-9]*([A-Za-z]{1,2})[^A-Za-z0-9]*$")
_INNER_BRACKET_RE = re.compile(r"\[[^\[\]]*\]")
_TAG_RE = re.compile(r"<[^<>]{0,80}>")
_PRON_RE = re.compile(r"\\[^\\\n]*\\")
_ATTRIBUTION_RE = re.compile(r"\s--\s?[A-Z][^\n]*|^--[A-Z][^\n]*", re.M)
_POS_RE = re.compile(
    r"(?:^|[\s,(])(n|v\. t|v\. i|v|a|adj|adv|prep|conj|interj|pron|p\. p|p\. a|imp|pl)\.(?=[\s,;\[(]|$)"
)
_RUN_IN_RE = re.compile(r"(?:(?<=[.;])|(?<=--))\s+[A-Za-z'-]*[*\"`][A-Za-z'][A-Za-z*\"`'-]*")
_LEAD_PRON_RE = re.compile(r"^\([^()]*[*\"`][^()]*\)\s*,?\s*")
_LEAD_POS_RE = re.compile(r"^(?:n|a|adj|adv|v\. t|v\. i|prep|conj|interj|pron)\.\s+")
_SENSE_START_RE = re.compile(r"^\s*(?:\d+\.|\([a-z]\))\s*")
_BAD_DEFINITION_START = ("see ", "same as", "alt. of", "of ", "pl. of", "imp. of", "p. p.", "obs", "syn:", "note:")


def _replace_code(match: re.Match[str]) -> str:
    """Turn an accent/symbol code into ASCII; leave other bracket groups for later removal."""
    content = match.group(1)
    if content in _SPECIAL_CODES:
        return _SPECIAL_CODES[content]
    letters = _LETTER_CODE_RE.match(content)
    if letters and not content.isalpha() and not content.endswith("."):  # [a^] ['e] [=oo] [.a], not [R.]
        return letters.group(1)
    return match.group(0)


def _strip_brackets(text: str) -> str:
    """Remove [...] groups (etymologies, labels, source markers), innermost first."""
    previous = None
    while previous != text:
        previous = text
        text = _INNER_BRACKET_RE.sub("", text)
    return text.replace("[", "").replace("]", "")


def _clean_markup(text: str) -> str:
    """Strip GCIDE markup from a span: tags, accent codes, brackets, braces; keep line breaks."""
    text = _TAG_RE.sub("", text)
    text = _CODE_RE.sub(_replace_code, text)
    text = _strip_brackets(text)
    return text.replace("{", "").replace("}", "")


def _split_header(block: str) -> tuple[str, str]:
    """Split an entry into its header (headwords, pronunciation, part of speech, etymology) and its body.

    The header ends at the first line break outside brackets/parentheses after the headword line.
    """
    depth = 0
    for index, char in enumerate(block):
        if char in "[({":
            depth += 1
        elif char in "])}":
            depth = max(0, depth - 1)
        elif char == "\n" and depth == 0 and index > 0:
            return block[:index], block[index + 1 :]
    return block, ""


def _header_pos(header: str) -> str:
    """Part of speech from an entry header ('n', 'v. t', 'a', ...), '' if none is found."""
    cleaned = _strip_brackets(_CODE_RE.sub(_replace_code, _PRON_RE.sub(" ", header)))
    match = _POS_RE.search(cleaned)
    return match.group(1) if match else ""


def _paragraphs(body: str) -> list[str]:
    """Cleaned, whitespace-normalised paragraphs of an entry body (quotations and notes included)."""
    cleaned = _clean_markup(body)
    return [normalize_text(part) for part in re.split(r"\n\s*\n", cleaned) if part.strip()]


def _first_sense(body: str) -> str:
    """The first sense of an entry body: the first paragraph that is not a note/synonym/quote, cleaned."""
    for raw in re.split(r"\n\s*\n", body):
        stripped = raw.strip()
        if not stripped or raw.startswith("        ") or stripped.startswith(("Note:", "Syn:", "{", "--")):
            continue
        text = _ATTRIBUTION_RE.sub("", _clean_markup(raw))
        text = _LEAD_POS_RE.sub("", _LEAD_PRON_RE.sub("", normalize_text(text)))  # "(a*bas"sis), n. ..."
        text = _SENSE_START_RE.sub("", _SENSE_START_RE.sub("", text))  # "5. (a) The face..." -> "The face..."
        text = _RUN_IN_RE.split(text, maxsplit=1)[0].rstrip(" -")  # drop run-in forms "Il*lim"it*ed*ness, n."
        if text:
            return _ascii_fold(text)
    return ""


_HEADWORD_RE = re.compile(r"(?:^|,)\s*([^\\,\n]+?)\s*\\[^\\\n]*\\")


def _parse_block(block: str, index_word: str) -> tuple[str, str, str, frozenset[str]]:
    """(pos, first-sense definition, cleaned full text, lower-case headwords) of one dictd block."""
    header, body = _split_header(block.lstrip("\n"))
    pos = _header_pos(header)
    definition = _first_sense(body)
    headwords = frozenset(_ascii_fold(w).strip().lower() for w in _HEADWORD_RE.findall(header))
    head = index_word + (f" ({pos}.)" if pos else "")
    text = _ascii_fold("\n".join([head, *_paragraphs(body)]))
    return pos, definition, text, headwords


def _gcide_index_path(dict_path: Path) -> Path:
    """The .index next to a .dict(.dz) file."""
    name = dict_path.name
    stem = name[: -len(".dict.dz")] if name.endswith(".dict.dz") else name.rsplit(".dict", 1)[0]
    return dict_path.with_name(stem + ".index")


_LAST_PARSE_STATS: dict[str, float] = {}


def last_parse_stats() -> dict[str, float]:
    """Timing and size figures of the most recent GCIDE parse or cache load in this process."""
    return dict(_LAST_PARSE_STATS)


def _cache_dir() -> Path:
    """Folder for on-disk caches ($LOPKIT_CACHE_DIR or ~/.cache/lopkit)."""
    return Path(os.environ.get("LOPKIT_CACHE_DIR") or Path.home() / ".cache" / "lopkit")


def _parse_gcide_files(dict_path: Path, index_path: Path) -> tuple[GcideEntry, ...]:
    """Decompress the dictionary and parse every indexed block (no caching)."""
    with open(index_path, encoding="utf-8", errors="replace") as handle:
        rows = parse_dictd_index(handle)
    raw = dict_path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    parsed_blocks: dict[tuple[int, int], tuple[int, tuple[str, str, str, frozenset[str]]]] = {}
    entries: list[GcideEntry] = []
    seen: set[tuple[str, int, int]] = set()
    for word, offset, length in rows:
        if (word, offset, length) in seen:
            continue
        seen.add((word, offset, length))
        if offset + length > len(data):
            raise ValueError(
                f"{index_path}: entry {word!r} points past the end of {dict_path} ({offset}+{length} > {len(data)})"
            )
        if (offset, length) not in parsed_blocks:
            block = data[offset : offset + length].decode("utf-8", errors="replace")
            parsed_blocks[(offset, length)] = (len(parsed_blocks), _parse_block(block, word))
        block_id, (pos, definition, text, headwords) = parsed_blocks[(offset, length)]
        word = _ascii_fold(word)
        entries.append(
            GcideEntry(word, definition, pos, text, block=block_id, headword=word.lower() in headwords)
        )
    return tuple(entries)


@functools.lru_cache(maxsize=4)
def _load_gcide_cached(dict_path: str, index_path: str, stamp: tuple, use_disk_cache: bool) -> tuple[GcideEntry, ...]:
    """Parse (or load from the disk cache) a GCIDE dictionary; cached in memory per files' stamp."""
    start = time.perf_counter()
    cache_file = None
    if use_disk_cache:
        digest = hashlib.sha1(repr((dict_path, index_path, stamp, PARSER_VERSION)).encode()).hexdigest()[:16]
        cache_file = _cache_dir() / f"gcide-{digest}.pkl"
        if cache_file.is_file():
            try:
                with open(cache_file, "rb") as handle:
                    entries = pickle.load(handle)
                _LAST_PARSE_STATS.update(seconds=time.perf_counter() - start, entries=len(entries), from_cache=1.0)
                return entries
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
                pass  # a broken cache is re-parsed and rewritten
    entries = _parse_gcide_files(Path(dict_path), Path(index_path))
    _LAST_PARSE_STATS.update(seconds=time.perf_counter() - start, entries=len(entries), from_cache=0.0)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_suffix(f".tmp{os.getpid()}")
            with open(partial, "wb") as handle:
                pickle.dump(entries, handle, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(partial, cache_file)
        except OSError:
            pass  # caching is an optimisation only
    return entries


def load_gcide(
    path: str | os.PathLike[str] = DEFAULT_GCIDE_DICT,
    index_path: str | os.PathLike[str] | None = None,
    *,
    use_disk_cache: bool = True,
) -> tuple[GcideEntry, ...]:
    """Parse GCIDE (dictd ``.dict.dz`` + ``.index``) into entries, one per (index word, block); cached.

    Raises DatasetNotFoundError naming the ``dict-gcide`` package when a file is missing.
    """
    dict_path = Path(path).expanduser()
    index = Path(index_path).expanduser() if index_path is not None else _gcide_index_path(dict_path)
    for needed in (dict_path, index):
        if not needed.is_file():
            raise DatasetNotFoundError(f"GCIDE dictionary file {needed} not found. {GCIDE_INSTALL_HINT}")
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (dict_path, index))
    return _load_gcide_cached(str(dict_path.resolve()), str(index.resolve()), stamp, use_disk_cache)


def _valid_mc_definition(word: str, definition: str) -> bool:
    """Whether a (word, definition) pair makes a clean definition item (short, ASCII, no give-away)."""
    low = definition.lower()
    return (
        DEFINITION_CHARS[0] <= len(definition) <= DEFINITION_CHARS[1]
        and definition.isascii()
        and word not in low
        and not low.startswith(_BAD_DEFINITION_START)
        and not any(c in definition for c in "{}[]\\<>*")
    )


@functools.lru_cache(maxsize=8)
def _definition_index(entries: tuple[GcideEntry, ...]) -> tuple[dict[str, frozenset[str]], dict[str, dict[str, tuple]]]:
    """(all first-sense definitions per lower-case word, MC candidates per split: word -> (definition, pos))."""
    all_defs: dict[str, set[str]] = {}
    candidates: dict[str, dict[str, tuple]] = {split: {} for split in SPLITS}
    for entry in entries:
        word = entry.word.lower()
        if entry.definition:
            all_defs.setdefault(word, set()).add(entry.definition)
        if not entry.headword or not re.fullmatch(r"[a-z]{3,20}", word):
            continue
        if not _valid_mc_definition(word, entry.definition):
            continue
        split = key_split("word", word)
        candidates[split].setdefault(word, (entry.definition, entry.pos))
    return {w: frozenset(d) for w, d in all_defs.items()}, candidates


def gcide_definitions_by_word(entries: Sequence[GcideEntry]) -> dict[str, frozenset[str]]:
    """Every first-sense definition of each lower-case word (homographs merged)."""
    return _definition_index(tuple(entries))[0]


def gcide_blocks_by_split(entries: Sequence[GcideEntry]) -> dict[str, list[str]]:
    """Cleaned entry texts per split; a block goes to a split only if all its index words belong to it."""
    words_of_block: dict[int, set[str]] = {}
    text_of_block: dict[int, str] = {}
    for entry in entries:
        words_of_block.setdefault(entry.block, set()).add(entry.word.lower())
        text_of_block.setdefault(entry.block, entry.text)
    result: dict[str, list[str]] = {split: [] for split in SPLITS}
    for block, words in words_of_block.items():
        splits = {key_split("word", word) for word in words}
        if len(splits) == 1:
            result[splits.pop()].append(text_of_block[block])
    return result


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


# ----------------------------------------------------------------------------------------------------------------
# generated domains (pure, seeded by a random.Random)


def arithmetic_line(a: int, b: int, p: int) -> str:
    """Pretraining surface form ``"a+b mod p = c"``."""
    return f"{a}+{b} mod {p} = {(a + b) % p}"


def _arithmetic_keys(split: str) -> list[tuple[int, int, int]]:
    """All canonical (a <= b, p) operand triples of a split, in a fixed order."""
    return _arithmetic_keys_cached(split)


@functools.lru_cache(maxsize=4)
def _arithmetic_keys_cached(split: str) -> list[tuple[int, int, int]]:
    """Cached enumeration of the arithmetic keys of a split."""
    return [
        (a, b, p)
        for p in ARITHMETIC_MODULI
        for a in range(p)
        for b in range(a, p)
        if key_split("arith", _arithmetic_key(a, b, p)) == split
    ]


def _arithmetic_key(a: int, b: int, p: int) -> str:
    """Canonical key of an addition problem (a+b and b+a share it, so they share a split)."""
    return f"{min(a, b)}+{max(a, b)} mod {p}"


def _random_string(rng: random.Random) -> str:
    """A random lower-case string (length in REVERSAL_LENGTHS) that is not a palindrome."""
    while True:
        length = rng.randint(*REVERSAL_LENGTHS)
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
        if text != text[::-1] and len(set(text)) > 2:
            return text


def _split_string(rng: random.Random, split: str) -> str:
    """A random string whose key falls in ``split`` (rejection sampling)."""
    while True:
        text = _random_string(rng)
        if key_split("string", text) == split:
            return text


def kv_line(rng: random.Random) -> str:
    """Key-value recall line, e.g. ``"kv: a=3 k=7 x=1 ? k -> 7"``."""
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    values = [rng.randint(0, 9) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"kv: {pairs} ? {keys[query]} -> {values[query]}"


def _dyck_valid(text: str) -> bool:
    """Whether a string of ()[] is balanced."""
    stack: list[str] = []
    pairs = {")": "(", "]": "["}
    for char in text:
        if char in "([":
            stack.append(char)
        elif not stack or stack.pop() != pairs[char]:
            return False
    return not stack


def dyck_line(rng: random.Random) -> str:
    """Dyck validity line, e.g. ``"dyck: ([]) -> valid"`` (about half valid)."""
    if rng.random() < 0.5:  # grow a valid string
        text = ""
        for _ in range(rng.randint(1, 5)):
            pair = rng.choice(["()", "[]"])
            cut = rng.randint(0, len(text))
            inner = rng.randint(cut, len(text))
            text = text[:cut] + pair[0] + text[cut:inner] + pair[1] + text[inner:]
    else:
        text = "".join(rng.choice("()[]") for _ in range(rng.randint(2, 10)))
    return f"dyck: {text} -> {'valid' if _dyck_valid(text) else 'invalid'}"


# ----------------------------------------------------------------------------------------------------------------
# multiple-choice items


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: score each choice by log P(choice | context); ``answer`` indexes the true one."""

    domain: str
    context: str
    choices: tuple[str, ...]
    answer: int
    key: str = ""  # the underlying key that decides the split

    def __post_init__(self) -> None:
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} out of range for {len(self.choices)} choices")


def _place_answer(rng: random.Random, answer: str, distractors: list[str]) -> tuple[tuple[str, ...], int]:
    """Insert the answer at a uniformly random position among the distractors."""
    position = rng.randrange(len(distractors) + 1)
    choices = distractors[:position] + [answer] + distractors[position:]
    return tuple(choices), position


def _arithmetic_item(rng: random.Random, key: tuple[int, int, int]) -> MCItem:
    """``"a+b mod p ="`` with the true value and 3 nearby wrong values (distinct offsets in -3..3)."""
    a, b, p = key
    if rng.random() < 0.5:  # present a+b or b+a (the same key)
        a, b = b, a
    value = (a + b) % p
    offsets = rng.sample([-3, -2, -1, 1, 2, 3], N_CHOICES - 1)
    distractors = [f" {(value + o) % p}" for o in offsets]
    choices, answer = _place_answer(rng, f" {value}", distractors)
    return MCItem("arithmetic", f"{a}+{b} mod {p} =", choices, answer, key=_arithmetic_key(a, b, p))


def _reversal_distractors(rng: random.Random, text: str) -> list[str] | None:
    """Swap of two different chars of the reversal, the unreversed string and a rotation of the reversal."""
    target = text[::-1]
    pairs = [(i, j) for i in range(len(target)) for j in range(i + 1, len(target)) if target[i] != target[j]]
    rng.shuffle(pairs)
    rotations = list(range(1, len(target)))
    rng.shuffle(rotations)
    for i, j in pairs:
        swapped = list(target)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        for shift in rotations:
            candidates = ["".join(swapped), text, target[shift:] + target[:shift]]
            if len({target, *candidates}) == N_CHOICES:
                return candidates
    return None


def _reversal_item(rng: random.Random, text: str) -> MCItem | None:
    """``"reverse: abc ->"`` with 4 candidate strings (None if no 3 distinct perturbations exist)."""
    distractors = _reversal_distractors(rng, text)
    if distractors is None:
        return None
    choices, answer = _place_answer(rng, " " + text[::-1], [" " + d for d in distractors])
    return MCItem("reversal", f"reverse: {text} ->", choices, answer, key=text)


def _similar_pick(
    rng: random.Random, pool: tuple[list[int], list[str]], length: int, count: int, exclude: set[str]
) -> list[str] | None:
    """Pick ``count`` distinct texts from a length-sorted (lengths, texts) pool, preferring lengths x0.67..x1.5."""
    lengths, texts = pool
    lo, hi = bisect_left(lengths, int(length / 1.5)), bisect_right(lengths, int(length * 1.5) + 1)
    for start, stop in ((lo, hi), (0, len(texts))):
        window = range(start, stop)
        if len(window) < count:
            continue
        picked: list[str] = []
        for _ in range(50 * count):
            text = texts[rng.choice(window)]
            if text not in exclude and text not in picked:
                picked.append(text)
                if len(picked) == count:
                    return picked
    return None


def _length_sorted(pairs: Iterable[tuple[int, str]]) -> tuple[list[int], list[str]]:
    """(lengths, texts) of (length, text) pairs sorted by length then text."""
    ordered = sorted(pairs)
    return [n for n, _ in ordered], [t for _, t in ordered]


def _definition_items(entries: Sequence[GcideEntry], n: int | None, rng: random.Random, split: str) -> list[MCItem]:
    """Definition items for ``split``: distractors from other words of the split (same pos, similar length)."""
    all_defs, candidates = _definition_index(tuple(entries))
    pool = candidates[split]
    words = sorted(pool)
    chosen = _choose_keys(rng, words, n, "definition", split)
    by_pos: dict[str, list[tuple[int, str]]] = {}
    everything: list[tuple[int, str]] = []
    for word in words:
        definition, pos = pool[word]
        by_pos.setdefault(pos, []).append((len(definition), definition))
        everything.append((len(definition), definition))
    sorted_by_pos = {pos: _length_sorted(group) for pos, group in by_pos.items()}
    sorted_everything = _length_sorted(everything)
    items = []
    for word in chosen:
        definition, pos = pool[word]
        exclude = set(all_defs.get(word, ())) | {definition}
        picked = None
        if len(by_pos.get(pos, ())) > 20:
            picked = _similar_pick(rng, sorted_by_pos[pos], len(definition), N_CHOICES - 1, exclude)
        if picked is None:
            picked = _similar_pick(rng, sorted_everything, len(definition), N_CHOICES - 1, exclude)
        if picked is None:
            raise ValueError(f"not enough distinct definitions in split {split!r} to build 4-choice items")
        choices, answer = _place_answer(rng, " " + definition, [" " + d for d in picked])
        items.append(MCItem("definition", f"Which definition fits {word}?", choices, answer, key=word))
    return items


def _fortune_pool(fortunes: Sequence[str], split: str) -> list[tuple[str, str, str]]:
    """(key, context, answer) of every cloze-able fortune of a split."""
    result = []
    for fortune in fortunes:
        key = fortune_key(fortune)
        if key_split("fortune", key) != split:
            continue
        parts = _cloze_parts(fortune)
        if parts is not None:
            result.append((key, *parts))
    return result


def _fortune_items(fortunes: Sequence[str], n: int | None, rng: random.Random, split: str) -> list[MCItem]:
    """Cloze items: first half as context; true second half vs 3 second halves of other fortunes."""
    pool = _fortune_pool(fortunes, split)
    endings = _length_sorted({(len(answer), answer) for _, _, answer in pool})
    chosen = _choose_keys(rng, list(range(len(pool))), n, "fortune_cloze", split)
    items = []
    for index in chosen:
        key, context, answer = pool[index]
        picked = _similar_pick(rng, endings, len(answer), N_CHOICES - 1, {answer})
        if picked is None:
            raise ValueError(f"not enough fortunes in split {split!r} to build 4-choice cloze items")
        choices, position = _place_answer(rng, answer, picked)
        items.append(MCItem("fortune_cloze", context, choices, position, key=key))
    return items


def _choose_keys(rng: random.Random, keys: list, n: int | None, domain: str, split: str) -> list:
    """``n`` distinct keys drawn without replacement (all of them, shuffled, when n is None)."""
    if n is None:
        n = len(keys)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > len(keys):
        raise ValueError(
            f"{domain}/{split} has only {len(keys)} distinct keys; ask for n <= {len(keys)} "
            f"(or n=None for all of them)"
        )
    return rng.sample(keys, n)


def mc_pool_size(
    domain: str,
    split: str,
    *,
    gcide_path: str | os.PathLike[str] = DEFAULT_GCIDE_DICT,
    fortunes_dir: str | os.PathLike[str] = DEFAULT_FORTUNES_DIR,
) -> int | None:
    """Number of distinct keys available for ``domain``/``split`` (None: unbounded, i.e. reversal)."""
    _check_split(split)
    if domain == "arithmetic":
        return len(_arithmetic_keys(split))
    if domain == "reversal":
        return None
    if domain == "definition":
        return len(_definition_index(load_gcide(gcide_path))[1][split])
    if domain == "fortune_cloze":
        return len(_fortune_pool(load_fortunes(fortunes_dir), split))
    raise ValueError(f"unknown MC domain {domain!r}; choose from {', '.join(MC_DOMAINS)}")


def build_mc_items(
    domain: str,
    n: int | None,
    seed: int,
    split: str,
    *,
    gcide_path: str | os.PathLike[str] = DEFAULT_GCIDE_DICT,
    fortunes_dir: str | os.PathLike[str] = DEFAULT_FORTUNES_DIR,
) -> list[MCItem]:
    """``n`` distinct-key 4-choice items of ``domain`` from ``split`` (n=None: every key of the split).

    Reproducible from (domain, n, seed, split); the answer position is uniform over the 4 slots.
    A ValueError says how many keys exist when ``n`` asks for more (see :func:`mc_pool_size`).
    """
    _check_split(split)
    rng = random.Random(f"mc|{domain}|{split}|{seed}")
    if domain == "arithmetic":
        return [_arithmetic_item(rng, key) for key in _choose_keys(rng, _arithmetic_keys(split), n, domain, split)]
    if domain == "reversal":
        if n is None or n < 0:
            raise ValueError(f"reversal needs an explicit n >= 0 (its key space is unbounded), got {n}")
        items: list[MCItem] = []
        seen: set[str] = set()
        while len(items) < n:
            text = _split_string(rng, split)
            item = None if text in seen else _reversal_item(rng, text)
            if item is not None:
                seen.add(text)
                items.append(item)
        return items
    if domain == "definition":
        return _definition_items(load_gcide(gcide_path), n, rng, split)
    if domain == "fortune_cloze":
        return _fortune_items(load_fortunes(fortunes_dir), n, rng, split)
    raise ValueError(f"unknown MC domain {domain!r}; choose from {', '.join(MC_DOMAINS)}")


# ----------------------------------------------------------------------------------------------------------------
# SFT batches


def sft_batch(
    items: Sequence[MCItem], context: int, *, pad_value: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + correct answer as byte tokens ``[B, context+1]`` and a loss mask ``[B, context]`` on answer bytes.

    ``mask[b, t]`` is True iff target ``tokens[b, t+1]`` is a byte of the answer. Too-long rows are truncated
    from the left (the answer is kept whole); short rows are right-padded with ``pad_value`` (masked out).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not items:
        raise ValueError("sft_batch needs at least one item")
    tokens = torch.full((len(items), context + 1), pad_value, dtype=torch.long)
    mask = torch.zeros((len(items), context), dtype=torch.bool)
    for row, item in enumerate(items):
        prompt = item.context.encode("utf-8")
        answer = item.choices[item.answer].encode("utf-8")
        if len(answer) > context:
            raise ValueError(
                f"answer of {len(answer)} bytes does not fit a context of {context}: {item.choices[item.answer]!r}"
            )
        if not prompt:
            raise ValueError("an SFT item needs a non-empty prompt (the first answer byte must be predicted)")
        sequence = (prompt + answer)[-(context + 1) :]
        tokens[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        start = len(sequence) - len(answer)  # index in `sequence` of the first answer byte
        mask[row, start - 1 : len(sequence) - 1] = True
    return tokens, mask


# ----------------------------------------------------------------------------------------------------------------
# pretraining corpus


@dataclass
class PretrainCorpusConfig:
    """Sources and mixture proportions (``mix_*``, normalised to sum 1) of the pretraining byte stream."""

    gcide_path: str = str(DEFAULT_GCIDE_DICT)
    fortunes_dir: str = str(DEFAULT_FORTUNES_DIR)
    mix_gcide: float = 0.35  # cleaned dictionary entries (the "web text")
    mix_fortunes: float = 0.15  # fortunes, one whitespace-normalised fortune per line (cloze surface form)
    mix_definition: float = 0.15  # "Which definition fits w? d" and "w: d" lines
    mix_arithmetic: float = 0.1  # "a+b mod p = c"
    mix_reversal: float = 0.1  # "reverse: abc -> cba"
    mix_copy: float = 0.05  # "copy: abc -> abc"
    mix_kv: float = 0.05  # "kv: a=3 k=7 ? k -> 7"
    mix_dyck: float = 0.05  # "dyck: ([]) -> valid"
    generated_lines: int = 20000  # lines per generated domain held in memory
    use_disk_cache: bool = True

    def validate(self) -> None:
        """Check proportions and sizes; raise ConfigError with a fix."""
        mixes = self.mixture()
        for name, value in mixes.items():
            require(value >= 0 and value == value, f"mix_{name} must be a number >= 0, got {value}")
        require(sum(mixes.values()) > 0, "at least one mix_* proportion must be > 0 (they are normalised to sum 1)")
        require(self.generated_lines >= 10, f"generated_lines must be >= 10, got {self.generated_lines}")

    def mixture(self) -> dict[str, float]:
        """The raw ``mix_*`` fields by source name."""
        return {f.name[4:]: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("mix_")}


def _generated_lines(domain: str, split: str, count: int, rng: random.Random) -> list[str]:
    """``count`` pretraining lines of a generated domain drawn from the keys of ``split``."""
    if domain == "arithmetic":
        keys = _arithmetic_keys(split)
        ordered = (keys[rng.randrange(len(keys))] for _ in range(count))
        return [arithmetic_line(b, a, p) if rng.random() < 0.5 else arithmetic_line(a, b, p) for a, b, p in ordered]
    if domain == "reversal":
        return [f"reverse: {t} -> {t[::-1]}" for t in (_split_string(rng, split) for _ in range(count))]
    if domain == "copy":
        return [f"copy: {t} -> {t}" for t in (_split_string(rng, split) for _ in range(count))]
    if domain == "kv":
        return [kv_line(rng) for _ in range(count)]
    if domain == "dyck":
        return [dyck_line(rng) for _ in range(count)]
    raise ValueError(f"unknown generated domain {domain!r}")


class PretrainCorpus:
    """Byte-level pretraining mixture of one split; ``batch`` draws random windows, reproducibly."""

    def __init__(self, seed: int = 0, split: str = "train", config: PretrainCorpusConfig | None = None) -> None:
        self.seed = seed
        self.split = _check_split(split)
        self.config = config if config is not None else PretrainCorpusConfig()
        self.config.validate()
        start = time.perf_counter()
        rng = random.Random(f"corpus|{split}|{seed}")
        mixture = {name: w for name, w in self.config.mixture().items() if w > 0}
        texts: dict[str, list[str]] = {}
        entries = None
        if "gcide" in mixture or "definition" in mixture:
            entries = load_gcide(self.config.gcide_path, use_disk_cache=self.config.use_disk_cache)
        if "gcide" in mixture:
            texts["gcide"] = list(gcide_blocks_by_split(entries)[split])
        if "definition" in mixture:
            pool = _definition_index(tuple(entries))[1][split]
            texts["definition"] = [
                line for word in sorted(pool) for line in (
                    f"Which definition fits {word}? {pool[word][0]}", f"{word}: {pool[word][0]}")
            ]  # fmt: skip
        if "fortunes" in mixture:
            fortunes = load_fortunes(self.config.fortunes_dir)
            texts["fortunes"] = [
                normalize_text(f) for f in fortunes if key_split("fortune", fortune_key(f)) == split
            ]
        for domain in GENERATED_DOMAINS:
            if domain in mixture:
                texts[domain] = _generated_lines(domain, split, self.config.generated_lines, rng)
        self.source_names = tuple(name for name in mixture if texts.get(name))
        if not self.source_names:
            raise ValueError(f"the pretraining corpus of split {split!r} is empty; check the mix_* proportions")
        buffers = []
        for name in self.source_names:
            docs = texts[name]
            rng.shuffle(docs)
            buffers.append(torch.frombuffer(bytearray(("\n".join(docs) + "\n").encode("utf-8")), dtype=torch.uint8))
        self.source_sizes = torch.tensor([len(b) for b in buffers], dtype=torch.long)
        self.source_starts = torch.cumsum(self.source_sizes, 0) - self.source_sizes
        self.buffer = torch.cat(buffers)
        weights = torch.tensor([mixture[name] for name in self.source_names], dtype=torch.float64)
        self.weights = weights / weights.sum()
        self.build_seconds = time.perf_counter() - start

    def batch(
        self, batch_size: int, context: int, generator: torch.Generator | None = None, *, return_sources: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[batch_size, context+1]`` byte tokens; each row a random window of one source (drawn by weight).

        With ``return_sources`` also the source index of every row (into :attr:`source_names`).
        """
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
        too_short = [n for n, size in zip(self.source_names, self.source_sizes.tolist()) if size < context + 1]
        if too_short:
            raise ValueError(f"sources {too_short} hold fewer than context+1={context + 1} bytes")
        source = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        room = (self.source_sizes[source] - context).to(torch.float64)  # valid window starts: 0..room-1
        offsets = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * room).long()
        offsets = torch.minimum(offsets, room.long() - 1)
        index = (self.source_starts[source] + offsets)[:, None] + torch.arange(context + 1)
        tokens = self.buffer[index].long()
        return (tokens, source) if return_sources else tokens

    def source_text(self, name: str) -> str:
        """The whole text of one source (for inspection and tests)."""
        i = self.source_names.index(name)
        start, size = int(self.source_starts[i]), int(self.source_sizes[i])
        return bytes(self.buffer[start : start + size].tolist()).decode("utf-8")

    def heldout_tokens(self, n_bytes: int, split: str = "test") -> torch.Tensor:
        """First ``n_bytes`` of a held-out split's cleaned GCIDE entries, in a fixed shuffled order (WikiText analog).

        The order does not depend on the corpus seed, so every model is measured on the same bytes.
        """
        if _check_split(split) == "train":
            raise ValueError("held-out text must come from split 'val' or 'test', not 'train'")
        entries = load_gcide(self.config.gcide_path, use_disk_cache=self.config.use_disk_cache)
        texts = list(gcide_blocks_by_split(entries)[split])
        random.Random(f"heldout|{split}").shuffle(texts)
        data = "\n".join(texts).encode("utf-8")
        if n_bytes < 2 or n_bytes > len(data):
            raise ValueError(f"n_bytes must be in 2..{len(data)} (held-out {split} GCIDE text), got {n_bytes}")
        return torch.tensor(list(data[:n_bytes]), dtype=torch.long)
