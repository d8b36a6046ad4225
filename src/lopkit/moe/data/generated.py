"""Generated domains (arithmetic, reversal/copy strings, key-value recall, Dyck brackets), seeded by a random.Random."""

from __future__ import annotations

import functools
import random
from lopkit.moe.data.text import ARITHMETIC_MAX, REVERSAL_LENGTHS, key_split


# ----------------------------------------------------------------------------------------------------------------
# generated domains (pure, seeded by a random.Random)


def arithmetic_line(a: int, b: int) -> str:
    """Pretraining surface form ``"a+b = c"`` (plain addition)."""
    return f"{a}+{b} = {a + b}"


def _arithmetic_keys(split: str) -> list[tuple[int, int]]:
    """All canonical (a <= b) operand pairs of a split, in a fixed order."""
    return _arithmetic_keys_cached(split)


@functools.lru_cache(maxsize=4)
def _arithmetic_keys_cached(split: str) -> list[tuple[int, int]]:
    """Cached enumeration of the arithmetic keys of a split."""
    return [
        (a, b)
        for a in range(ARITHMETIC_MAX + 1)
        for b in range(a, ARITHMETIC_MAX + 1)
        if key_split("arith", _arithmetic_key(a, b)) == split
    ]


def _arithmetic_key(a: int, b: int) -> str:
    """Canonical key of an addition problem (a+b and b+a share it, so they share a split)."""
    return f"{min(a, b)}+{max(a, b)}"


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


def generated_line(domain: str, rng: random.Random) -> str:
    """One fresh pretraining line of a generated domain, drawn from the whole key space (every split).

    Pretraining samples these anew for every batch row, so a run sees as many distinct problems as it has rows;
    only the multiple-choice *items* (question and distractors) are held out by split, not the facts.
    """
    if domain == "arithmetic":
        return arithmetic_line(rng.randint(0, ARITHMETIC_MAX), rng.randint(0, ARITHMETIC_MAX))
    if domain == "reversal":
        text = _random_string(rng)
        return f"reverse: {text} -> {text[::-1]}"
    if domain == "copy":
        text = _random_string(rng)
        return f"copy: {text} -> {text}"
    if domain == "kv":
        return kv_line(rng)
    if domain == "dyck":
        return dyck_line(rng)
    raise ValueError(f"unknown generated domain {domain!r}")
