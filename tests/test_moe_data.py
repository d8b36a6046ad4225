"""Tests of lopkit.moe.data on a synthetic dictd dictionary and fortune folder (the real data: slow tests)."""

from __future__ import annotations

import gzip
import os
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lopkit.configs import ConfigError, build_config
from lopkit.data.errors import DatasetNotFoundError
from lopkit.moe import data as D

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
N_WORDS = 400


def b64(value: int) -> str:
    """Independent dictd base64 encoder (most significant digit first)."""
    digits = ""
    while True:
        digits = ALPHABET[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def _words(rng: random.Random, count: int) -> list[str]:
    """Distinct random lower-case words that contain no 'q' (so 'q...' words are reserved below)."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice("abcdefghijklmnoprstuvwxyz") for _ in range(rng.randint(5, 9))))
    return sorted(words)


def _definition(rng: random.Random, i: int) -> str:
    """A plausible-looking first sense that never contains the headword."""
    nouns = ["stone", "river", "tool", "bird", "song", "law", "coin", "tree", "ship", "cloth"]
    adjectives = ["small", "old", "bright", "heavy", "sacred", "common", "rare", "green"]
    return f"A {rng.choice(adjectives)} {rng.choice(nouns)} of kind {i} used by {rng.choice(nouns)}s."


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch):
    """Keep the on-disk GCIDE cache of these tests out of ~/.cache."""
    monkeypatch.setenv("LOPKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lopkit-cache"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny GCIDE-like dictd dictionary + fortune folder, with known definitions and fortunes."""
    root = tmp_path_factory.mktemp("moe_data")
    rng = random.Random(0)
    words = _words(rng, N_WORDS)
    blocks: list[tuple[list[str], str]] = []  # (index words, block text)
    first_senses: dict[str, set[str]] = {}
    for i, word in enumerate(words):
        cap = word.capitalize()
        first, second = _definition(rng, i), _definition(rng, 10_000 + i)
        text = (
            f"{cap} \\{cap[:2]}*{cap[2:]}\\ ([a^]{word}), n. [OE. {word}e, fr. L. {{{word}us}};\n"
            f"   cf. F. {word}[`e]r.] (Zool.)\n"
            f"   1. {first}\n      [1913 Webster]\n\n"
            f"            A quotation with the {word} in it.  --Shak.\n      [1913 Webster]\n\n"
            f"   2. {second} [Obs.]\n      [1913 Webster]\n"
        )
        blocks.append(([cap], text))
        first_senses.setdefault(word, set()).add(first)
    # a homograph: 'qbank' has two blocks with different first senses; an accented definition
    homograph = ["A raised mound of earth beside a river or a lake.", "An establishment that keeps and lends money."]
    for sense in homograph:
        blocks.append((["Qbank"], f"Qbank \\Qbank\\, n. [OE. banke.]\n   {sense}\n   [1913 Webster]\n"))
        first_senses.setdefault("qbank", set()).add(sense)
    accented = "A caf[`e] serving na[\"i]ve coffee to the [ae]sthetes."
    blocks.append((["Qcafe"], f"Qcafe \\Qcafe\\, n.\n   {accented}\n   [1913 Webster]\n"))
    first_senses["qcafe"] = {"A cafe serving naive coffee to the aesthetes."}
    # a block with two headwords and a run-in phrase that must not count as a headword
    blocks.append(
        (["Qmulti", "Qmultis", "Qmulti stone"],
         "Qmulti \\Qmul\"ti\\, Qmultis \\Qmul\"tis\\, n.\n   A thing with two names for testing.\n"
         "   [1913 Webster]\n\n   {Qmulti stone}, a stone with many names.\n      [1913 Webster]\n")
    )  # fmt: skip
    first_senses["qmulti"] = first_senses["qmultis"] = {"A thing with two names for testing."}
    # blocks shared by two headwords: they belong to a split only when both words do
    shared = {}
    for i, (one, two) in enumerate(zip(words[:60:2], words[1:60:2])):
        sense = f"A shared sense number {i} for two headwords."
        one, two = "z" + one, "z" + two
        blocks.append(([one.capitalize(), two.capitalize()],
                       f"{one.capitalize()} \\{one}\\, {two.capitalize()} \\{two}\\, n.\n   {sense}\n"))  # fmt: skip
        first_senses[one] = first_senses[two] = {sense}
        shared[sense] = (one, two)
    dict_path = write_dictd(root / "toy.dict.dz", blocks)
    # fortunes: two files, a .dat, a .u8 link and an offensive folder that must all be skipped
    fortunes_dir = root / "fortunes"
    (fortunes_dir / "off").mkdir(parents=True)
    fortunes = []
    for i in range(700):
        a, b = rng.sample(_FORTUNE_WORDS, 2)
        fortunes.append(f"The {a} of number {i} is\n   better than {b} and {rng.randint(0, 999)} other things.")
    fortunes.append("A short one-liner that is a cloze item too, yes.")
    fortunes.append("x" * 300)  # too long for a cloze item but still a fortune
    half = len(fortunes) // 2
    (fortunes_dir / "alpha").write_text("\n%\n".join(fortunes[:half]) + "\n%\n", encoding="utf-8")
    (fortunes_dir / "beta").write_text("\n%\n".join(fortunes[half:]) + "\n%\n", encoding="utf-8")
    (fortunes_dir / "alpha.dat").write_bytes(b"\x00\x01binary")
    os.symlink("alpha", fortunes_dir / "alpha.u8")
    (fortunes_dir / "off" / "rude").write_text("RUDE FORTUNE\n%\n", encoding="utf-8")
    return {
        "dict": dict_path, "fortunes_dir": fortunes_dir, "first_senses": first_senses, "words": words,
        "fortunes": fortunes, "homograph": homograph, "shared": shared,
    }  # fmt: skip


def write_dictd(dict_path: Path, blocks: list[tuple[list[str], str]]) -> Path:
    """Write a gzip dictd dictionary and its index (sorted, with a metadata entry) from (words, text) blocks."""
    data, index_rows, offset = b"", [], 0
    for index_words, text in blocks:
        raw = text.encode("utf-8")
        for w in index_words:
            index_rows.append(f"{w}\t{b64(offset)}\t{b64(len(raw))}")
        data += raw
        offset += len(raw)
    index_rows.append(f"00-database-info\t{b64(0)}\t{b64(10)}")
    dict_path.write_bytes(gzip.compress(data))
    dict_path.with_name(dict_path.name.replace(".dict.dz", ".index")).write_text(
        "\n".join(sorted(index_rows)) + "\n", encoding="utf-8"
    )
    return dict_path


_FORTUNE_WORDS = ["cat", "dog", "truth", "money", "wisdom", "time", "code", "love", "bread", "light", "music"]


def _corpus_config(synthetic, **overrides) -> D.PretrainCorpusConfig:
    values = {"gcide_path": str(synthetic["dict"]), "fortunes_dir": str(synthetic["fortunes_dir"]),
              "use_disk_cache": False, **overrides}  # fmt: skip
    return build_config(D.PretrainCorpusConfig, values)


# ---------------------------------------------------------------------------------------------------- parsing


def test_dictd_base64_roundtrip_and_index():
    values = [0, 1, 63, 64, 4095, 4096, 123456789, 2**40 + 7]
    assert [D.decode_dictd_base64(b64(v)) for v in values] == values
    rows = D.parse_dictd_index([f"apple\t{b64(100)}\t{b64(42)}\n", "00-database-url\tA\tB\n", "\n"])
    assert rows == [("apple", 100, 42)]
    with pytest.raises(ValueError, match="invalid dictd base64 digit"):
        D.decode_dictd_base64("A-B")
    with pytest.raises(ValueError, match="3"):
        D.parse_dictd_index(["only-a-word\n"])


def test_load_gcide_cleans_markup_and_keeps_first_sense(synthetic):
    entries = D.load_gcide(synthetic["dict"], use_disk_cache=False)
    by_word: dict[str, list[D.GcideEntry]] = {}
    for entry in entries:
        by_word.setdefault(entry.word.lower(), []).append(entry)
    assert len(by_word) == N_WORDS + 5 + 60  # + qbank, qcafe, qmulti, qmultis, 'qmulti stone', 30 shared pairs
    assert len(by_word["qbank"]) == 2  # homographs kept as separate entries
    for word, senses in synthetic["first_senses"].items():
        assert {e.definition for e in by_word[word]} == senses, word
    for entry in entries:
        for mark in ("[", "]", "{", "}", "\\", "<"):
            assert mark not in entry.definition and mark not in entry.text, (entry.word, mark)
        assert entry.text.isascii()
    sample = by_word[synthetic["words"][0]][0]
    assert sample.pos == "n" and sample.headword
    assert "Obs" not in sample.text and "OE." not in sample.text  # labels and etymology removed
    assert "A quotation with the" in sample.text  # quotations stay in the running text
    assert by_word["qmulti stone"][0].headword is False and by_word["qmultis"][0].headword is True


def test_missing_files_name_the_debian_packages(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dict-gcide"):
        D.load_gcide(tmp_path / "nothing.dict.dz")
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes"):
        D.load_fortunes(tmp_path / "no-fortunes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes"):
        D.load_fortunes(tmp_path / "empty")


def test_gcide_disk_cache_roundtrip(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("LOPKIT_CACHE_DIR", str(tmp_path))
    D._load_gcide_cached.cache_clear()
    first = D.load_gcide(synthetic["dict"])
    assert D.last_parse_stats()["from_cache"] == 0.0
    assert len(list(tmp_path.glob("gcide-*.pkl"))) == 1
    D._load_gcide_cached.cache_clear()
    second = D.load_gcide(synthetic["dict"])
    assert D.last_parse_stats()["from_cache"] == 1.0
    assert second == first
    assert D.load_gcide(synthetic["dict"]) is second  # in-memory cache


def test_load_fortunes_skips_index_links_and_offensive(synthetic):
    fortunes = D.load_fortunes(synthetic["fortunes_dir"])
    assert [D.normalize_text(f) for f in fortunes] == [D.normalize_text(f) for f in synthetic["fortunes"]]
    assert not any("RUDE" in f or "binary" in f for f in fortunes)


# ---------------------------------------------------------------------------------------------------- MC items


def _independent_key(item: D.MCItem) -> str:
    """Recompute an item's underlying key from its text only."""
    correct = item.choices[item.answer]
    if item.domain == "arithmetic":
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+) =", item.context).groups())
        return f"{min(a, b)}+{max(a, b)}"
    if item.domain == "reversal":
        return re.fullmatch(r"reverse: ([a-z]+) ->", item.context).group(1)
    if item.domain == "definition":
        return re.fullmatch(r"Which definition fits ([a-z]+)\?", item.context).group(1)
    import hashlib

    return hashlib.sha1((item.context + correct).encode()).hexdigest()


def _items(synthetic, domain, n, seed, split):
    paths = {"gcide_path": synthetic["dict"], "fortunes_dir": synthetic["fortunes_dir"]}
    return D.build_mc_items(domain, n, seed, split, **paths)


@pytest.mark.parametrize("domain", D.MC_DOMAINS)
def test_mc_items_are_well_formed_and_correct(synthetic, domain):
    n = 30
    items = _items(synthetic, domain, n, 0, "train")
    assert len(items) == n
    normalized_fortunes = {D.normalize_text(f) for f in synthetic["fortunes"]}
    for item in items:
        assert item.domain == domain and len(item.choices) == 4 and len(set(item.choices)) == 4
        correct = item.choices[item.answer]
        assert all(c.startswith(" ") and c.strip() for c in item.choices)
        if domain == "arithmetic":
            a, b = map(int, re.findall(r"\d+", item.context))
            assert int(correct) == a + b and 0 <= a <= 99 and 0 <= b <= 99
            for c in item.choices:  # far-apart distractors: units and tens digits differ from the answer's
                if c != correct:
                    assert int(c) >= 0 and abs(int(c) - int(correct)) in (11, 22, 33)
                    assert int(c) % 10 != int(correct) % 10 and int(c) // 10 % 10 != int(correct) // 10 % 10
        elif domain == "reversal":
            source = item.context.split()[1]
            assert correct.strip() == source[::-1]
            assert " " + source in item.choices  # the unreversed distractor
            for c in item.choices:
                assert sorted(c.strip()) == sorted(source)  # perturbations keep the letters
        elif domain == "definition":
            word = item.context.split()[-1].rstrip("?")
            assert correct.strip() in synthetic["first_senses"][word]
            for c in item.choices:
                if c != correct:  # never a definition of the same word (homographs included)
                    assert c.strip() not in synthetic["first_senses"][word]
        else:
            assert item.context + correct in normalized_fortunes
            assert abs(len(item.context) - len(correct)) <= 2 + max(len(w) for w in item.context.split())


def test_definition_distractors_avoid_homograph_senses(tmp_path):
    # 'tank' (a text-train word, so in the definition pool) has three senses; one lives in a block shared with a
    # partner word, whose only sense is thus also a sense of 'tank' and must never be offered as a wrong answer for
    # 'tank'. Three other words of the same item split give the distractors.
    rng = random.Random(9)
    assert D.key_split("word", "tank") == "train"
    split = D.key_split("definition_item", "tank")
    partner, *others = [w for w in _words(rng, 300)
                        if D.key_split("word", w) == "train" and D.key_split("definition_item", w) == split][:4]
    senses = {"tank": ["A raised mound of earth beside a river.", "An establishment that keeps money.",
                       "A bench; a high seat of judgment."]}  # fmt: skip
    head = partner.capitalize()
    blocks = [(["Tank"], f"Tank \\Tank\\, n.\n   {senses['tank'][0]}\n"),
              (["Tank"], f"Tank \\Tank\\, n.\n   {senses['tank'][1]}\n"),
              ([head, "Tank"], f"{head} \\{head}\\, Tank \\Tank\\, n.\n   {senses['tank'][2]}\n")]  # fmt: skip
    for i, word in enumerate(others):
        blocks.append(([word.capitalize()], f"{word.capitalize()} \\{word}\\, n.\n   {_definition(rng, i)}\n"))
    path = write_dictd(tmp_path / "homograph.dict.dz", blocks)
    for seed in range(10):
        items = D.build_mc_items("definition", None, seed, split, gcide_path=path)
        (item,) = [item for item in items if item.key == "tank"]
        wrong = [c.strip() for i, c in enumerate(item.choices) if i != item.answer]
        assert item.choices[item.answer].strip() in senses["tank"]
        assert not set(wrong) & set(senses["tank"])


def test_shared_blocks_go_to_a_split_only_when_all_their_words_do(synthetic):
    entries = D.load_gcide(synthetic["dict"], use_disk_cache=False)
    texts = D.gcide_blocks_by_split(entries)
    mixed = 0
    for sense, (one, two) in synthetic["shared"].items():
        s1, s2 = D.key_split("word", one), D.key_split("word", two)
        mixed += s1 != s2
        for split in D.SPLITS:
            found = any(sense in text for text in texts[split])
            assert found == (s1 == s2 == split), (sense, s1, s2, split)
    assert mixed > 0


@pytest.mark.parametrize("domain", D.MC_DOMAINS)
def test_splits_are_disjoint_by_underlying_key(synthetic, domain):
    keys = {}
    for split in D.SPLITS:
        pool = None if domain == "reversal" else D.mc_pool_size(
            domain, split, gcide_path=synthetic["dict"], fortunes_dir=synthetic["fortunes_dir"])  # fmt: skip
        n = 200 if pool is None else min(200, pool)
        assert n >= 10, (domain, split, pool)
        items = _items(synthetic, domain, n, 1, split)
        recomputed = [_independent_key(item) for item in items]
        assert recomputed == [item.key for item in items]
        assert len(set(recomputed)) == len(items)  # distinct keys inside a split
        keys[split] = set(recomputed)
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_answer_position_uniform_and_reproducible(synthetic):
    items = _items(synthetic, "arithmetic", 2000, 7, "train")
    counts = Counter(item.answer for item in items)
    assert set(counts) == {0, 1, 2, 3}
    chi2 = sum((c - 500) ** 2 / 500 for c in counts.values())
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom
    assert _items(synthetic, "arithmetic", 2000, 7, "train") == items
    assert _items(synthetic, "arithmetic", 2000, 8, "train") != items


def test_too_many_items_is_a_clear_error(synthetic):
    pool = D.mc_pool_size("fortune_cloze", "test", fortunes_dir=synthetic["fortunes_dir"])
    assert len(_items(synthetic, "fortune_cloze", None, 0, "test")) == pool
    with pytest.raises(ValueError, match=f"only {pool} distinct keys"):
        _items(synthetic, "fortune_cloze", pool + 1, 0, "test")
    with pytest.raises(ValueError, match="unknown MC domain"):
        _items(synthetic, "trivia", 3, 0, "test")
    with pytest.raises(ValueError, match="split"):
        _items(synthetic, "arithmetic", 3, 0, "holdout")


# ---------------------------------------------------------------------------------------------------- SFT


def test_sft_batch_mask_covers_exactly_the_answer_bytes(synthetic):
    items = _items(synthetic, "definition", 8, 0, "train") + _items(synthetic, "arithmetic", 8, 0, "train")
    context = 48  # short enough that long definition items get truncated from the left
    tokens, mask = D.sft_batch(items, context)
    assert tokens.shape == (16, context + 1) and mask.shape == (16, context) and mask.dtype == torch.bool
    truncated = 0
    for row, item in enumerate(items):
        answer = item.choices[item.answer].encode()
        full = (item.context + item.choices[item.answer]).encode()
        kept = full[-(context + 1) :]
        truncated += len(full) > context + 1
        assert bytes(tokens[row, : len(kept)].tolist()) == kept
        assert tokens[row, len(kept) :].eq(0).all()
        targets = tokens[row, 1:]
        assert bytes(targets[mask[row]].tolist()) == answer  # the masked targets are the answer, in order
        positions = mask[row].nonzero().flatten().tolist()
        assert positions == list(range(len(kept) - 1 - len(answer), len(kept) - 1))
    assert truncated > 0
    with pytest.raises(ValueError, match="does not fit"):
        D.sft_batch(items[:1], 4)


# ---------------------------------------------------------------------------------------------------- corpus


def _valid_generated_line(line: str) -> str | None:
    """The generated domain a complete line belongs to, if it is a correct line of it (else None)."""
    if m := re.fullmatch(r"(\d+)\+(\d+) = (\d+)", line):
        return "arithmetic" if int(m.group(1)) + int(m.group(2)) == int(m.group(3)) else None
    if m := re.fullmatch(r"reverse: ([a-z]+) -> ([a-z]+)", line):
        return "reversal" if m.group(1)[::-1] == m.group(2) else None
    if m := re.fullmatch(r"copy: ([a-z]+) -> ([a-z]+)", line):
        return "copy" if m.group(1) == m.group(2) else None
    if line.startswith(("kv: ", "dyck: ")):
        return line.split(":")[0]
    return None


def test_corpus_batches_are_reproducible_bytes(synthetic):
    corpus = D.PretrainCorpus(seed=0, split="train", config=_corpus_config(synthetic))
    first, sources = corpus.batch(64, 64, torch.Generator().manual_seed(5), return_sources=True)
    again = corpus.batch(64, 64, torch.Generator().manual_seed(5))
    other = corpus.batch(64, 64, torch.Generator().manual_seed(6))
    assert first.shape == (64, 65) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.min()) >= 0 and int(first.max()) <= 255
    rebuilt = D.PretrainCorpus(seed=0, split="train", config=_corpus_config(synthetic))
    assert torch.equal(rebuilt.batch(64, 64, torch.Generator().manual_seed(5)), first)
    # a text-source row is a contiguous window of the text buffer; a generated row is made of correct fresh lines
    text = bytes(corpus.buffer.tolist())
    kinds = Counter()
    for row, source in zip(first, sources.tolist()):
        name = corpus.source_names[source]
        data = bytes(row.tolist())
        if name in ("gcide", "fortunes", "definition"):
            assert data in text
            kinds["text"] += 1
        else:
            lines = data.decode().split("\n")[1:-1]
            assert lines and all(_valid_generated_line(line) == name for line in lines), (name, lines)
            kinds["generated"] += 1
    assert kinds["text"] and kinds["generated"]


def test_corpus_mixture_proportions(synthetic):
    config = _corpus_config(synthetic, mix_gcide=0.5, mix_fortunes=0.2, mix_definition=0.0, mix_arithmetic=0.3,
                            mix_reversal=0.0, mix_copy=0.0, mix_kv=0.0, mix_dyck=0.0)  # fmt: skip
    corpus = D.PretrainCorpus(seed=1, split="train", config=config)
    assert corpus.source_names == ("gcide", "fortunes", "arithmetic")
    _, sources = corpus.batch(4000, 16, torch.Generator().manual_seed(0), return_sources=True)
    freq = torch.bincount(sources, minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64), atol=0.03)


def test_eval_items_facts_are_in_pretraining_but_not_their_question_form(synthetic):
    corpus = D.PretrainCorpus(seed=2, split="train", config=_corpus_config(synthetic))
    definitions = set(corpus.source_text("definition").split("\n"))
    fortunes = set(corpus.source_text("fortunes").split("\n"))
    paths = {"gcide_path": synthetic["dict"], "fortunes_dir": synthetic["fortunes_dir"]}
    for split in ("val", "test"):
        for item in D.build_mc_items("definition", None, 0, split, **paths):
            word, answer = item.key, item.choices[item.answer].strip()
            assert f"{word}: {answer}" in definitions  # the fact is pretraining text
            assert f"{item.context} {answer}" not in definitions  # the held-out question form is not
            for choice in item.choices:  # the distractors are facts of other pool words, seen too
                assert any(line.endswith(": " + choice.strip()) for line in definitions)
        for item in D.build_mc_items("fortune_cloze", None, 0, split, **paths):
            assert item.context + item.choices[item.answer] in fortunes
    train = D.build_mc_items("definition", None, 0, "train", **paths)
    assert all(f"{i.context} {i.choices[i.answer].strip()}" in definitions for i in train)
    # the definition pool's entries are pretraining text, never held-out perplexity text
    heldout = bytes(corpus.heldout_tokens(2000).tolist()).decode()
    pool_defs = {d for ds in D.definition_pool(D.load_gcide(synthetic["dict"])).values() for d, _pos in ds.values()}
    assert heldout and not any(d in heldout for d in pool_defs)


def test_generated_domains_are_fresh_every_batch_and_cover_every_split(synthetic):
    config = _corpus_config(synthetic, mix_gcide=0.0, mix_fortunes=0.0, mix_definition=0.0, mix_arithmetic=1.0,
                            mix_reversal=0.0, mix_copy=0.0, mix_kv=0.0, mix_dyck=0.0)  # fmt: skip
    corpus = D.PretrainCorpus(seed=3, split="train", config=config)
    generator = torch.Generator().manual_seed(0)
    seen: list[set[str]] = []
    for _ in range(3):
        batch = corpus.batch(64, 96, generator)
        lines = {line for row in batch for line in bytes(row.tolist()).decode().split("\n")[1:-1]}
        assert all(_valid_generated_line(line) == "arithmetic" for line in lines)
        seen.append(lines)
    assert len(seen[0]) > 300 and len(seen[0] & seen[1]) < len(seen[0]) // 10  # new problems each batch
    splits = Counter(D.key_split("arith", "{}+{}".format(*sorted(map(int, re.findall(r"\d+", line)[:2]))))
                     for lines in seen for line in lines)
    assert splits["val"] > 0 and splits["test"] > 0  # facts are not held out, only items are


def test_corpus_config_validation(synthetic):
    with pytest.raises(ConfigError, match="mix_kv"):
        _corpus_config(synthetic, mix_kv=-0.1)
    zero = {f"mix_{name}": 0.0 for name in D.PretrainCorpusConfig().mixture()}
    with pytest.raises(ConfigError, match="at least one"):
        _corpus_config(synthetic, **zero)
    with pytest.raises(ConfigError, match="unknown config key"):
        _corpus_config(synthetic, mix_wiki=0.1)


def test_generated_lines_are_correct():
    rng = random.Random(0)
    for _ in range(300):
        line = D.dyck_line(rng)
        text, verdict = re.fullmatch(r"dyck: ([()\[\]]+) -> (valid|invalid)", line).groups()
        reduced = text
        while "()" in reduced or "[]" in reduced:
            reduced = reduced.replace("()", "").replace("[]", "")
        assert (verdict == "valid") == (reduced == "")
        for domain in D.GENERATED_DOMAINS:
            assert _valid_generated_line(D.generated_line(domain, rng)) == domain
        kv = D.kv_line(rng)
        pairs, query, value = re.fullmatch(r"kv: (.*) \? ([a-z]) -> (\d)", kv).groups()
        assert dict(p.split("=") for p in pairs.split())[query] == value


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_gcide_and_fortunes():
    if not D.DEFAULT_GCIDE_DICT.is_file() or not D.DEFAULT_FORTUNES_DIR.is_dir():
        pytest.skip("dict-gcide / fortunes not installed")
    entries = D.load_gcide()
    assert len(entries) > 150_000
    by_word = D.gcide_definitions_by_word(entries)
    assert len(by_word["bank"]) >= 5
    fortunes = D.load_fortunes()
    assert len(fortunes) > 10_000
    for domain in D.MC_DOMAINS:
        pool = D.mc_pool_size(domain, "test")
        items = D.build_mc_items(domain, 2000 if pool is None else min(2000, pool), 0, "test")
        assert all(len(set(item.choices)) == 4 for item in items)
        if domain == "definition":
            for item in items:
                word = item.key
                assert all(c.strip() not in by_word[word] for i, c in enumerate(item.choices) if i != item.answer)


@pytest.mark.parametrize("domain", ["definition", "fortune_cloze"])
def test_the_answers_length_rank_is_uniform_so_length_alone_scores_chance(domain):
    """Summed log-likelihood favours short choices: the answer must not be systematically longer or shorter.

    With distractors drawn from a length window, the definition answer was the shortest choice in only 15 % of
    items (a length-only model scored ~0.15, below the 0.25 chance); each rank now comes up about a quarter.
    """
    items = D.build_mc_items(domain, None, 3, "val") + D.build_mc_items(domain, None, 3, "test")  # ~590 items
    ranks = [sum(len(c.encode()) < len(item.choices[item.answer].encode()) for c in item.choices) for item in items]
    shares = np.bincount(ranks, minlength=4) / len(items)
    assert np.all(np.abs(shares - 0.25) < 0.06), shares  # ~3.3 binomial standard errors at n ~ 590
    longest = np.mean([np.argmax([len(c.encode()) for c in it.choices]) == it.answer for it in items])
    assert abs(longest - 0.25) < 0.06
