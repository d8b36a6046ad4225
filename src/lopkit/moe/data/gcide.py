"""GCIDE (Debian ``dict-gcide``, dictd format): parsing, markup cleaning, caching, definition index."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from lopkit.data.errors import DatasetNotFoundError
from lopkit.moe.data.text import (
    DEFAULT_GCIDE_DICT,
    DEFINITION_CHARS,
    GCIDE_INSTALL_HINT,
    PARSER_VERSION,
    SPLITS,
    _DICTD_VALUE,
    _ascii_fold,
    key_split,
    normalize_text,
)

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
