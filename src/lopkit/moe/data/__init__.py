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

Splits: items are held out, facts are not. Every item has an underlying *key* (the lower-case word, the
operands ``a+b``, the source string of a reversal, the SHA-1 of a whitespace-normalised fortune). :func:`key_split`
hashes the key (BLAKE2b, independent of any seed) into train/val/test with fractions 0.8/0.1/0.1, so the SFT,
validation and test *items* (question format plus distractors) are disjoint by construction and stable across
runs. The *facts* behind every item are in pretraining: the definitions of all ``DEFINITION_VOCAB`` pool words
(whose GCIDE entries are text-train entries), all ``FORTUNE_POOL`` cloze fortunes, and arithmetic, reversal and
the in-context tasks sampled fresh for every batch row from the whole key space. Only the GCIDE *entry text*
keeps a separate train/val/test split (namespace ``word``), for held-out perplexity.

Multiple-choice formats (score each choice by log P(choice | context); ``context + choice`` is exactly the
surface form of the pretraining line for the correct choice; choices start with a space):

* ``arithmetic``: context ``"37+58 ="``, choices e.g. ``(" 62", " 95", " 73", " 128")`` with answer 1
  (``" 95"``); operands 0..99, the distractors are the sum shifted by 3 distinct offsets of +-11, +-22, +-33
  (never negative), so a distractor's units and tens digits both differ from the answer's. Pretraining line: ``"37+58 = 95"``.
* ``reversal``: context ``"reverse: stone ->"``, choices ``(" enots", " eonts", " stone", " tsone")`` -- the
  true reversal, a copy with two different characters swapped, the unreversed string and a rotation of the
  reversal. Pretraining line: ``"reverse: stone -> enots"``.
* ``definition``: context ``"Which definition fits zebra?"``, choices are 4 first-sense GCIDE definitions with a
  leading space, e.g. ``" Any member of three species of African wild horses ..."``; the 3 distractors come
  from other words of the same split, preferably of the same part of speech and similar length (the answer's
  byte-length rank among the 4 choices is uniform, so choosing by length scores chance), and are never
  a definition of the asked word (homographs such as the several ``Bank`` entries are excluded).
  Pretraining lines: ``"zebra: Any member ..."`` for every pool word, and the question form
  ``"Which definition fits zebra? Any member ..."`` only for the words of the train items.
* ``fortune_cloze``: context = the first half of a short fortune (cut at the word boundary nearest the middle),
  choices = the true second half and the second halves of 3 other fortunes of the same split with similar
  length, e.g. context ``"A fool and his money"`` / choices ``(" are soon parted.", ...)``. Pretraining line:
  the whole whitespace-normalised fortune.

Pretraining corpus (:class:`PretrainCorpus`): a mixture of sources with the proportions of
:class:`PretrainCorpusConfig` (``mix_*`` fields, normalised to sum 1): cleaned GCIDE entries, fortunes (one per
line), definition lines, arithmetic, reversal, copy (``"copy: abc -> abc"``), key-value recall
(``"kv: a=3 k=7 x=1 ? k -> 7"``) and Dyck-bracket validity (``"dyck: ([]) -> valid"``). Each batch row is
``context + 1`` bytes of one source: a random window of a fixed text source, or freshly generated lines of a
generated source, all drawn from a ``torch.Generator`` (reproducible).

Modules: :mod:`~lopkit.moe.data.text` (splits, constants), :mod:`~lopkit.moe.data.gcide`,
:mod:`~lopkit.moe.data.fortunes`, :mod:`~lopkit.moe.data.generated`, :mod:`~lopkit.moe.data.items` (MC items),
:mod:`~lopkit.moe.data.sft` and :mod:`~lopkit.moe.data.corpus`; this package re-exports their public names.
"""

from __future__ import annotations

from lopkit.moe.data.text import (  # noqa: F401
    DEFAULT_FORTUNES_DIR,
    DEFAULT_GCIDE_DICT,
    GENERATED_DOMAINS,
    MC_DOMAINS,
    N_CHOICES,
    SPLITS,
    key_split,
    normalize_text,
    text_to_tokens,
)
from lopkit.moe.data.gcide import (  # noqa: F401
    GcideEntry,
    _load_gcide_cached,
    decode_dictd_base64,
    gcide_blocks_by_split,
    gcide_definitions_by_word,
    last_parse_stats,
    load_gcide,
    parse_dictd_index,
)
from lopkit.moe.data.items import MCItem, build_mc_items, definition_pool, fortune_pool, mc_pool_size
from lopkit.moe.data.corpus import PretrainCorpus, PretrainCorpusConfig, definition_lines, fresh_window
from lopkit.moe.data.generated import arithmetic_line, dyck_line, generated_line, kv_line
from lopkit.moe.data.fortunes import fortune_key, load_fortunes
from lopkit.moe.data.sft import sft_batch


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
    "definition_lines",
    "definition_pool",
    "dyck_line",
    "fortune_key",
    "fortune_pool",
    "fresh_window",
    "gcide_blocks_by_split",
    "gcide_definitions_by_word",
    "generated_line",
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
