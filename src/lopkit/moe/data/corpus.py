"""The byte-level pretraining mixture (:class:`PretrainCorpus`) and its typed config."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from lopkit.configs import require
from lopkit.moe.data.text import (
    DEFAULT_FORTUNES_DIR,
    DEFAULT_GCIDE_DICT,
    GENERATED_DOMAINS,
    _check_split,
    key_split,
    normalize_text,
)
from lopkit.moe.data.gcide import _definition_index, gcide_blocks_by_split, load_gcide
from lopkit.moe.data.fortunes import fortune_key, load_fortunes
from lopkit.moe.data.generated import _arithmetic_keys, _split_string, arithmetic_line, dyck_line, kv_line

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
