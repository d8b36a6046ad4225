"""Tests of lopkit.moe.scoring against brute-force and closed-form scorers on tiny deterministic models."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lopkit.moe.data import MCItem
from lopkit.moe.scoring import agreement, choice_logprobs, language_model_stats, mc_accuracy, perplexity


def bigram_table(seed: int = 0) -> torch.Tensor:
    """A random 256x256 table of next-byte logits (row = previous byte)."""
    return torch.randn(256, 256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def bigram_fn(table: torch.Tensor):
    """logits_fn of a bigram model: the logits at position t depend only on token t."""
    return lambda tokens: table[tokens]


def prefix_fn(tokens: torch.Tensor) -> torch.Tensor:
    """A causal model that depends on the whole prefix (running sum of bytes) and the position."""
    running = torch.cumsum(tokens, dim=1)
    position = torch.arange(tokens.shape[1])
    grid = torch.arange(256, dtype=torch.float64)
    return torch.sin(running[..., None].double() * 0.37 + grid * 0.11) * 3 + torch.cos(position[:, None] * 0.5 + grid)


def random_items(rng: random.Random, n: int) -> list[MCItem]:
    letters = "abcdefghij klmnop"
    items = []
    for _ in range(n):
        context = "".join(rng.choice(letters) for _ in range(rng.randint(1, 40)))
        choices = tuple(" " + "".join(rng.choice(letters) for _ in range(rng.randint(1, 15))) for _ in range(4))
        items.append(MCItem("toy", context, choices, rng.randrange(4)))
    return items


def brute_force_bigram(table: torch.Tensor, items: list[MCItem]) -> torch.Tensor:
    """log P(choice | context) summed, straight from the bigram table, one byte at a time."""
    logprobs = torch.log_softmax(table, dim=-1)
    scores = torch.zeros(len(items), 4, dtype=torch.float64)
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            previous = item.context.encode()[-1]
            for byte in choice.encode():
                scores[i, c] += logprobs[previous, byte]
                previous = byte
    return scores


def test_choice_logprobs_match_bigram_brute_force():
    table = bigram_table()
    items = random_items(random.Random(0), 25)
    expected = brute_force_bigram(table, items)
    for batch_size in (1, 7, 1000):
        scores, n_bytes = choice_logprobs(bigram_fn(table), items, context_len=64, batch_size=batch_size)
        assert torch.allclose(scores, expected, atol=1e-9)
        assert n_bytes.tolist() == [[len(c.encode()) for c in item.choices] for item in items]


def test_choice_logprobs_match_one_row_at_a_time_with_truncation():
    items = random_items(random.Random(1), 20)
    context_len = 20  # many rows are longer than 21 bytes: they get truncated from the left
    expected = torch.zeros(len(items), 4, dtype=torch.float64)
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            row = list((item.context + choice).encode())[-(context_len + 1) :]
            logits = prefix_fn(torch.tensor([row[:-1]]))[0]
            logprobs = torch.log_softmax(logits, dim=-1)
            n = len(choice.encode())
            expected[i, c] = sum(logprobs[t, row[t + 1]] for t in range(len(row) - 1 - n, len(row) - 1))
    assert any(len((item.context + item.choices[0]).encode()) > context_len + 1 for item in items)
    for batch_size in (3, 64):
        scores, _ = choice_logprobs(prefix_fn, items, context_len=context_len, batch_size=batch_size)
        assert torch.allclose(scores, expected, atol=1e-9)


def test_padding_invariance_with_a_recurrent_model():
    torch.manual_seed(0)
    embed, gru, head = torch.nn.Embedding(256, 8), torch.nn.GRU(8, 16, batch_first=True), torch.nn.Linear(16, 256)

    def gru_fn(tokens):
        return head(gru(embed(tokens))[0])

    items = random_items(random.Random(2), 12)
    batched, _ = choice_logprobs(gru_fn, items, context_len=64, batch_size=48)
    single, _ = choice_logprobs(gru_fn, items, context_len=64, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)


def test_acc_and_acc_norm_differ_on_a_constructed_item():
    p_xx = 0.9
    table = torch.zeros(256, 256, dtype=torch.float64)  # uniform rows ...
    x = ord("x")
    table[x, x] = math.log(p_xx * 255 / (1 - p_xx))  # ... except P(x | x) = 0.9
    item = MCItem("toy", "abc", (" q", " xxxxxxxx"), answer=1)  # context must not end in x
    short = 2 * -math.log(256)
    long = 2 * -math.log(256) + 7 * math.log(p_xx)
    expected_pred = int(long > short)
    expected_norm = int(long / 9 > short / 2)
    assert (expected_pred, expected_norm) == (0, 1)  # the construction does what it claims
    result = mc_accuracy(bigram_fn(table), [item], context_len=32)
    scores, _ = choice_logprobs(bigram_fn(table), [item], context_len=32)
    assert torch.allclose(scores, torch.tensor([[short, long]], dtype=torch.float64))
    assert result["predictions"].tolist() == [expected_pred] and result["predictions_norm"].tolist() == [expected_norm]
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_mc_accuracy_matches_brute_force_argmax():
    table = bigram_table(3)
    items = random_items(random.Random(4), 40)
    expected = brute_force_bigram(table, items)
    lengths = torch.tensor([[len(c) for c in item.choices] for item in items], dtype=torch.float64)
    answers = torch.tensor([item.answer for item in items])
    result = mc_accuracy(bigram_fn(table), items, context_len=64, batch_size=16)
    assert result["acc"] == pytest.approx(float((expected.argmax(1) == answers).double().mean()))
    assert result["acc_norm"] == pytest.approx(float(((expected / lengths).argmax(1) == answers).double().mean()))


def test_perplexity_of_uniform_model_is_256():
    tokens = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
    uniform = lambda t: torch.zeros(*t.shape, 256, dtype=torch.float64)  # noqa: E731
    for context_len, stride in ((64, 64), (64, 16), (7, 3), (600, 600)):
        stats = language_model_stats(uniform, tokens, context_len, stride)
        assert stats.perplexity == pytest.approx(256.0, rel=1e-9)
        assert stats.bits_per_byte == pytest.approx(8.0, rel=1e-9)
        assert stats.n_predicted == 499
    assert perplexity(uniform, tokens, 32) == pytest.approx(256.0)
    assert perplexity(lambda t: torch.zeros(*t.shape, 256), tokens, 32) == pytest.approx(256.0, rel=1e-6)  # float32


def test_perplexity_of_bigram_model_matches_closed_form():
    table = bigram_table(5)
    tokens = torch.randint(0, 256, (333,), generator=torch.Generator().manual_seed(1))
    logprobs = torch.log_softmax(table, dim=-1)
    nll = -sum(float(logprobs[tokens[i - 1], tokens[i]]) for i in range(1, len(tokens))) / (len(tokens) - 1)
    for context_len, stride, batch_size in ((32, 32, 4), (32, 8, 3), (5, 5, 100), (128, 100, 1)):
        stats = language_model_stats(bigram_fn(table), tokens, context_len, stride, batch_size)
        assert stats.nll == pytest.approx(nll, rel=1e-9)
        assert stats.perplexity == pytest.approx(math.exp(nll), rel=1e-9)
        assert stats.bits_per_byte == pytest.approx(nll / math.log(2), rel=1e-9)


def test_perplexity_windows_see_the_promised_context():
    """With a prefix-dependent model, sliding windows equal direct per-token evaluation with the same context."""
    tokens = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(2))
    context_len, stride = 16, 4
    total = 0.0
    for s in range(1, 90, stride):  # each chunk s..e-1 is predicted from tokens[a:e-1]
        e = min(s + stride, 90)
        a = max(0, e - 1 - context_len)
        logprobs = torch.log_softmax(prefix_fn(tokens[a : e - 1][None])[0], dim=-1)
        total -= sum(float(logprobs[j - 1 - a, tokens[j]]) for j in range(s, e))
        assert s - 1 - a >= context_len - stride or a == 0  # at least context_len - stride bytes of context
    stats = language_model_stats(prefix_fn, tokens, context_len, stride, batch_size=5)
    assert stats.nll == pytest.approx(total / 89, rel=1e-9)


def test_agreement_and_input_errors():
    a, b = [0, 1, 2, 3, 1], [0, 1, 3, 3, 2]
    assert agreement(a, b) == pytest.approx(sum(x == y for x, y in zip(a, b)) / len(a))
    assert agreement(torch.tensor(a), torch.tensor(a)) == 1.0
    with pytest.raises(ValueError, match="equal length"):
        agreement([0, 1], [0])
    item = MCItem("toy", "ctx", (" a", " b", " c", " d"), 0)
    with pytest.raises(ValueError, match="expected"):
        choice_logprobs(lambda t: torch.zeros(*t.shape, 10), [item], 16)
    with pytest.raises(FloatingPointError, match="NaN"):
        choice_logprobs(lambda t: torch.full((*t.shape, 256), float("nan")), [item], 16)
    with pytest.raises(ValueError, match="all must match"):
        choice_logprobs(bigram_fn(bigram_table()), [item, MCItem("toy", "c", (" a", " b"), 0)], 16)
    with pytest.raises(ValueError, match="context_len"):
        choice_logprobs(bigram_fn(bigram_table()), [MCItem("toy", "c", (" " + "a" * 20, " b"), 0)], 8)
    with pytest.raises(ValueError, match="stride"):
        perplexity(bigram_fn(bigram_table()), torch.arange(10), 4, stride=5)
