"""The byte-level pretraining mixture (:class:`PretrainCorpus`) and its typed config."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from lopkit.configs import require
from lopkit.moe.data.fortunes import load_fortunes
from lopkit.moe.data.gcide import gcide_blocks_by_split, load_gcide
from lopkit.moe.data.generated import generated_line
from lopkit.moe.data.items import definition_pool, fortune_pool
from lopkit.moe.data.text import (
    DEFAULT_FORTUNES_DIR,
    DEFAULT_GCIDE_DICT,
    GENERATED_DOMAINS,
    _check_split,
)

# ----------------------------------------------------------------------------------------------------------------
# pretraining corpus

#: Sources of the pretraining mixture held as fixed text (the rest, GENERATED_DOMAINS, are sampled fresh per row).
TEXT_SOURCES = ("gcide", "fortunes", "definition")


@dataclass
class PretrainCorpusConfig:
    """Sources and mixture proportions (``mix_*``, normalised to sum 1) of the pretraining byte stream."""

    gcide_path: str = str(DEFAULT_GCIDE_DICT)
    fortunes_dir: str = str(DEFAULT_FORTUNES_DIR)
    mix_gcide: float = 0.3  # cleaned dictionary entries of the text-train split (the "web text")
    mix_fortunes: float = 0.15  # the FORTUNE_POOL cloze fortunes, one whitespace-normalised fortune per line
    mix_definition: float = 0.2  # "w: d" for every definition-pool word, "Which definition fits w? d" for train items
    mix_arithmetic: float = 0.15  # "a+b = c", fresh operands every row
    mix_reversal: float = 0.08  # "reverse: abc -> cba", fresh strings every row
    mix_copy: float = 0.04  # "copy: abc -> abc"
    mix_kv: float = 0.04  # "kv: a=3 k=7 ? k -> 7"
    mix_dyck: float = 0.04  # "dyck: ([]) -> valid"
    use_disk_cache: bool = True

    def validate(self) -> None:
        """Check proportions; raise ConfigError with a fix."""
        mixes = self.mixture()
        for name, value in mixes.items():
            require(value >= 0 and value == value, f"mix_{name} must be a number >= 0, got {value}")
        require(sum(mixes.values()) > 0, "at least one mix_* proportion must be > 0 (they are normalised to sum 1)")

    def mixture(self) -> dict[str, float]:
        """The raw ``mix_*`` fields by source name."""
        return {f.name[4:]: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("mix_")}


def definition_lines(entries: tuple, item_split_format: str = "train") -> list[str]:
    """The definition facts of the pretraining corpus: ``"w: d"`` for every pool word of every split, plus the MC
    question form ``"Which definition fits w? d"`` for the words of ``item_split_format`` (the SFT train items)."""
    pool = definition_pool(entries)
    lines = [f"{word}: {pool[split][word][0]}" for split in sorted(pool) for word in sorted(pool[split])]
    train = pool[item_split_format]
    lines += [f"Which definition fits {word}? {train[word][0]}" for word in sorted(train)]
    return lines


def fresh_window(domain: str, seed: int, width: int) -> bytes:
    """``width`` bytes of freshly generated lines of ``domain`` (a random.Random seeded with ``seed``), starting at a
    random phase inside the first line so that windows do not always begin at a line start."""
    rng = random.Random(seed)
    first = generated_line(domain, rng) + "\n"
    start = rng.randrange(len(first))
    parts, size = [first], len(first)
    while size < start + width:
        line = generated_line(domain, rng) + "\n"
        parts.append(line)
        size += len(line)
    return "".join(parts).encode("utf-8")[start : start + width]


class PretrainCorpus:
    """Byte-level pretraining mixture; ``batch`` draws rows reproducibly from a ``torch.Generator``.

    Text sources (GCIDE entries of ``split``, the fortune pool, the definition lines) are fixed buffers and a row is
    a random window of one of them; generated sources are sampled fresh for every row (seeded from the generator),
    so arithmetic, reversal and the in-context tasks never repeat a fixed list of lines.
    """

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
            texts["definition"] = definition_lines(tuple(entries))
        if "fortunes" in mixture:
            fortunes = load_fortunes(self.config.fortunes_dir)
            texts["fortunes"] = [context + answer for _key, context, answer, _split in fortune_pool(fortunes)]
        self.source_names = tuple(
            name for name in mixture if texts.get(name) or name in GENERATED_DOMAINS
        )
        if not self.source_names:
            raise ValueError(f"the pretraining corpus of split {split!r} is empty; check the mix_* proportions")
        buffers = []
        for name in self.source_names:
            docs = texts.get(name, [])
            rng.shuffle(docs)
            data = ("\n".join(docs) + "\n").encode("utf-8") if docs else b""
            buffers.append(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8))
        self.generated = torch.tensor([name in GENERATED_DOMAINS for name in self.source_names])
        self.source_sizes = torch.tensor([len(b) for b in buffers], dtype=torch.long)
        self.source_starts = torch.cumsum(self.source_sizes, 0) - self.source_sizes
        self.buffer = torch.cat(buffers)
        weights = torch.tensor([mixture[name] for name in self.source_names], dtype=torch.float64)
        self.weights = weights / weights.sum()
        self.build_seconds = time.perf_counter() - start

    def batch(
        self, batch_size: int, context: int, generator: torch.Generator | None = None, *, return_sources: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[batch_size, context+1]`` byte tokens; each row from one source (drawn by weight).

        With ``return_sources`` also the source index of every row (into :attr:`source_names`).
        """
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
        too_short = [n for n, size, gen in zip(self.source_names, self.source_sizes.tolist(), self.generated.tolist())
                     if not gen and size < context + 1]  # fmt: skip
        if too_short:
            raise ValueError(f"sources {too_short} hold fewer than context+1={context + 1} bytes")
        source = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        room = (self.source_sizes[source] - context).clamp(min=1).to(torch.float64)  # window starts: 0..room-1
        offsets = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * room).long()
        offsets = torch.minimum(offsets, room.long() - 1)
        row_seeds = torch.randint(0, 2**62, (batch_size,), generator=generator)
        index = (self.source_starts[source] + offsets)[:, None] + torch.arange(context + 1)
        fresh = self.generated[source]
        tokens = torch.empty((batch_size, context + 1), dtype=torch.long)
        if bool((~fresh).any()):
            tokens[~fresh] = self.buffer[index[~fresh]].long()
        for row in fresh.nonzero().flatten().tolist():
            data = fresh_window(self.source_names[int(source[row])], int(row_seeds[row]), context + 1)
            tokens[row] = torch.tensor(list(data), dtype=torch.long)
        return (tokens, source) if return_sources else tokens

    def source_text(self, name: str) -> str:
        """The whole text of one fixed-text source (for inspection and tests)."""
        i = self.source_names.index(name)
        if bool(self.generated[i]):
            raise ValueError(f"source {name!r} is generated fresh per batch row; it has no fixed text")
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
