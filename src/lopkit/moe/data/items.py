"""Multiple-choice items (arithmetic, reversal, definition, fortune cloze) and their split-aware builders."""

from __future__ import annotations

import functools
import hashlib
import os
import random
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from lopkit.moe.data.text import (
    ARITHMETIC_OFFSETS,
    DEFAULT_FORTUNES_DIR,
    DEFINITION_VOCAB,
    FORTUNE_POOL,
    SPLITS,
    DEFAULT_GCIDE_DICT,
    MC_DOMAINS,
    N_CHOICES,
    _check_split,
    key_split,
)
from lopkit.moe.data.gcide import GcideEntry, _definition_index, load_gcide
from lopkit.moe.data.fortunes import _cloze_parts, fortune_key, load_fortunes
from lopkit.moe.data.generated import _arithmetic_key, _arithmetic_keys, _split_string


# ----------------------------------------------------------------------------------------------------------------
# multiple-choice items

#: The choices of the ``mc_item_rule`` config field (moe_finetune and moe_eval): how the items are built.
#: ``length_rank_uniform`` (since 2026-12-07) draws distractors so that the answer's byte-length rank among the
#: choices is uniform (:func:`_similar_pick`). The field is part of the run id on purpose: stored runs made with the
#: older items (whose answer was rarely the shortest choice) are not reused.
MCItemRule = Literal["length_rank_uniform"]
#: The rule the builders here implement: the default of every ``mc_item_rule`` field.
MC_ITEM_RULE: MCItemRule = "length_rank_uniform"


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


def _arithmetic_item(rng: random.Random, key: tuple[int, int]) -> MCItem:
    """``"a+b ="`` with the true sum and 3 far-apart wrong sums (offsets from ARITHMETIC_OFFSETS, all >= 0)."""
    a, b = key
    if rng.random() < 0.5:  # present a+b or b+a (the same key)
        a, b = b, a
    value = a + b
    offsets = rng.sample([o for o in ARITHMETIC_OFFSETS if value + o >= 0], N_CHOICES - 1)
    distractors = [f" {value + o}" for o in offsets]
    choices, answer = _place_answer(rng, f" {value}", distractors)
    return MCItem("arithmetic", f"{a}+{b} =", choices, answer, key=_arithmetic_key(a, b))


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


def _draw_distinct(
    rng: random.Random, texts: list[str], window: tuple[int, int], count: int, exclude: set[str]
) -> list[str] | None:
    """``count`` distinct texts drawn from ``texts[start:stop]`` that are not in ``exclude`` (None if that fails)."""
    if count == 0:
        return []
    start, stop = window
    if stop - start < count:
        return None
    picked: list[str] = []
    for _ in range(50 * count):
        text = texts[rng.randrange(start, stop)]
        if text not in exclude and text not in picked:
            picked.append(text)
            if len(picked) == count:
                return picked
    return None


def _similar_pick(
    rng: random.Random, pool: tuple[list[int], list[str]], length: int, count: int, exclude: set[str]
) -> list[str] | None:
    """Pick ``count`` distinct texts from a length-sorted (byte lengths, texts) pool, preferring lengths x0.67..x1.5,
    with the answer's length rank among the ``count + 1`` choices uniform.

    A uniformly drawn number of the picks is strictly shorter than ``length`` and the rest strictly longer, so a
    strategy that reads only lengths (e.g. the highest summed log-likelihood, which favours short choices) scores
    chance, 1 / (count + 1). Drawing from a length window around ``length`` instead made the answer the shortest
    choice in only 15 % of the definition items (lengths are right-skewed), so a length-only model scored ~0.15.
    Ranks the pool cannot serve (no longer text, say) are skipped.
    """
    lengths, texts = pool
    low, mid_low = bisect_left(lengths, int(length / 1.5)), bisect_left(lengths, length)
    mid_high, high = bisect_right(lengths, length), bisect_right(lengths, int(length * 1.5) + 1)
    ranks = list(range(count + 1))
    rng.shuffle(ranks)
    for n_shorter in ranks:
        for shorter, longer in (((low, mid_low), (mid_high, high)), ((0, mid_low), (mid_high, len(texts)))):
            below = _draw_distinct(rng, texts, shorter, n_shorter, exclude)
            above = None if below is None else _draw_distinct(rng, texts, longer, count - n_shorter,
                                                               exclude | set(below))
            if below is not None and above is not None:
                return below + above
    return None


def _nbytes(text: str) -> int:
    """UTF-8 length: what the scorer sums log-probabilities over."""
    return len(text.encode("utf-8"))


def _length_sorted(pairs: Iterable[tuple[int, str]]) -> tuple[list[int], list[str]]:
    """(lengths, texts) of (length, text) pairs sorted by length then text."""
    ordered = sorted(pairs)
    return [n for n, _ in ordered], [t for _, t in ordered]


def _pool_order(namespace: str, key: str) -> bytes:
    """A seed-independent sort key that picks a fixed pseudo-random subset (the first N of a pool)."""
    return hashlib.blake2b(f"{namespace}|{key}".encode("utf-8"), digest_size=8).digest()


@functools.lru_cache(maxsize=8)
def _definition_pool_cached(entries: tuple[GcideEntry, ...]) -> dict[str, dict[str, tuple[str, str]]]:
    """The definition domain's words by item split: word -> (first-sense definition, part of speech)."""
    candidates = _definition_index(entries)[1]["train"]  # words whose GCIDE entry is pretraining text
    chosen = sorted(candidates, key=lambda w: _pool_order("definition_pool", w))[:DEFINITION_VOCAB]
    pool: dict[str, dict[str, tuple[str, str]]] = {split: {} for split in SPLITS}
    for word in sorted(chosen):
        pool[key_split("definition_item", word)][word] = candidates[word]
    return pool


def definition_pool(entries: Sequence[GcideEntry]) -> dict[str, dict[str, tuple[str, str]]]:
    """The ``DEFINITION_VOCAB`` words of the definition domain, by item split: ``{split: {word: (definition, pos)}}``.

    Every word (of every split) has its GCIDE entry in the pretraining text and its ``"word: definition"`` line in
    the pretraining corpus: the facts are seen, only the multiple-choice items of val/test words are held out.
    """
    return _definition_pool_cached(tuple(entries))


def _definition_items(entries: Sequence[GcideEntry], n: int | None, rng: random.Random, split: str) -> list[MCItem]:
    """Definition items for ``split``: distractors from other words of the split (same pos, similar length)."""
    all_defs = _definition_index(tuple(entries))[0]
    pool = definition_pool(entries)[split]
    words = sorted(pool)
    chosen = _choose_keys(rng, words, n, "definition", split)
    by_pos: dict[str, list[tuple[int, str]]] = {}
    everything: list[tuple[int, str]] = []
    for word in words:
        definition, pos = pool[word]
        by_pos.setdefault(pos, []).append((_nbytes(definition), definition))
        everything.append((_nbytes(definition), definition))
    sorted_by_pos = {pos: _length_sorted(group) for pos, group in by_pos.items()}
    sorted_everything = _length_sorted(everything)
    items = []
    for word in chosen:
        definition, pos = pool[word]
        exclude = set(all_defs.get(word, ())) | {definition}
        picked = None
        if len(by_pos.get(pos, ())) > 20:
            picked = _similar_pick(rng, sorted_by_pos[pos], _nbytes(definition), N_CHOICES - 1, exclude)
        if picked is None:
            picked = _similar_pick(rng, sorted_everything, _nbytes(definition), N_CHOICES - 1, exclude)
        if picked is None:
            raise ValueError(f"not enough distinct definitions in split {split!r} to build 4-choice items")
        choices, answer = _place_answer(rng, " " + definition, [" " + d for d in picked])
        items.append(MCItem("definition", f"Which definition fits {word}?", choices, answer, key=word))
    return items


def fortune_pool(fortunes: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """The ``FORTUNE_POOL`` cloze-able fortunes of the fortune_cloze domain: ``(key, context, answer, split)``.

    All of them (every split) are in the pretraining corpus; the split only decides which cloze *items* are used
    for SFT, validation and test.
    """
    return _fortune_pool_cached(tuple(fortunes))


@functools.lru_cache(maxsize=4)
def _fortune_pool_cached(fortunes: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """Cached :func:`fortune_pool`."""
    result = []
    for fortune in fortunes:
        parts = _cloze_parts(fortune)
        if parts is not None:
            key = fortune_key(fortune)
            result.append((key, *parts, key_split("fortune", key)))
    result.sort(key=lambda row: _pool_order("fortune_pool", row[0]))
    return result[:FORTUNE_POOL]


def _fortune_pool(fortunes: Sequence[str], split: str) -> list[tuple[str, str, str]]:
    """(key, context, answer) of the pool fortunes of a split."""
    return [(key, context, answer) for key, context, answer, s in fortune_pool(fortunes) if s == split]


def _fortune_items(fortunes: Sequence[str], n: int | None, rng: random.Random, split: str) -> list[MCItem]:
    """Cloze items: first half as context; true second half vs 3 second halves of other fortunes."""
    pool = _fortune_pool(fortunes, split)
    endings = _length_sorted({(_nbytes(answer), answer) for _, _, answer in pool})
    chosen = _choose_keys(rng, list(range(len(pool))), n, "fortune_cloze", split)
    items = []
    for index in chosen:
        key, context, answer = pool[index]
        picked = _similar_pick(rng, endings, _nbytes(answer), N_CHOICES - 1, {answer})
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
        return len(definition_pool(load_gcide(gcide_path))[split])
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
