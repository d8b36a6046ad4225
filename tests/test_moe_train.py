"""Unit tests of lopkit.moe.train: schedules, k sampling (binomial bound), configs, losses, NaN handling."""

from __future__ import annotations

import math

import pytest
import torch

from lopkit.configs import ConfigError
from lopkit.moe import train as T


# ------------------------------------------------------------------------------------------------- schedules


def test_lr_schedule_warmup_and_cosine_endpoints():
    base, total, warm, floor = 2e-3, 100, 10, 0.1
    warmup = [T.lr_at(s, total, base, warm, floor) for s in range(warm)]
    assert warmup == pytest.approx([base * (s + 1) / warm for s in range(warm)])
    assert T.lr_at(warm, total, base, warm, floor) == pytest.approx(base)
    # halfway through the decay the cosine factor is 1/2
    middle = warm + (total - warm) // 2
    assert T.lr_at(middle, total, base, warm, floor) == pytest.approx(base * (floor + (1 - floor) * 0.5))
    assert T.lr_at(total, total, base, warm, floor) == pytest.approx(base * floor)
    decay = [T.lr_at(s, total, base, warm, floor) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_anchor_weight_is_zero_then_linear_and_ends_at_one():
    total, fraction = 200, 0.06
    n_anchor = round(fraction * total)
    weights = [T.anchor_weight(t, total, fraction) for t in range(total)]
    start = total - n_anchor
    assert all(w == 0 for w in weights[:start])
    ramp = weights[start:]
    assert ramp[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(ramp, ramp[1:])]
    assert steps == pytest.approx([1 / n_anchor] * (n_anchor - 1))
    assert T.anchor_weight(5, total, 0.0) == 0.0


def test_k_distribution_mixes_uniform_and_anchor_and_ends_at_delta():
    total = 100
    before = T.k_distribution(10, total, (2, 3, 4), 3, 0.1)
    assert before == pytest.approx({2: 1 / 3, 3: 1 / 3, 4: 1 / 3})
    for t in range(total):
        probs = T.k_distribution(t, total, (2, 3, 4), 3, 0.1)
        assert sum(probs.values()) == pytest.approx(1.0)
        a = T.anchor_weight(t, total, 0.1)
        assert probs[3] == pytest.approx((1 - a) / 3 + a)
        assert probs[2] == pytest.approx((1 - a) / 3)
    assert T.k_distribution(total - 1, total, (2, 3, 4), 3, 0.1) == pytest.approx({2: 0.0, 3: 1.0, 4: 0.0})
    # an anchor outside K_train joins the support with mass a_t only
    outside = T.k_distribution(total - 1, total, (3, 4), 1, 0.1)
    assert outside[1] == pytest.approx(1.0)
    assert T.k_distribution(total - 1, total, (2, 3, 4), None, 0.1) == pytest.approx({2: 1 / 3, 3: 1 / 3, 4: 1 / 3})


def _binomial_tolerance(p: float, n: int, z: float = 4.5) -> float:
    """Half-width of a z-sigma binomial interval for an empirical frequency (plus one count of slack)."""
    return z * math.sqrt(p * (1 - p) / n) + 1 / n


@pytest.mark.parametrize("step", [0, 150, 185, 195, 199])
def test_sampled_k_frequencies_match_q_t_within_binomial_bound(step):
    total, fraction, draws = 200, 0.1, 4000
    probs = T.k_distribution(step, total, (2, 3, 4), 3, fraction)
    generator = torch.Generator().manual_seed(1234 + step)
    samples = [T.sample_k(probs, generator) for _ in range(draws)]
    for k, p in probs.items():
        freq = samples.count(k) / draws
        assert abs(freq - p) <= _binomial_tolerance(p, draws), (step, k, freq, p)
    assert set(samples) <= {k for k, p in probs.items() if p > 0}


def test_selection_steps_after_burn_in_and_always_the_last():
    steps = T.selection_steps(100, 15, 0.5)
    assert steps == [60, 75, 90, 100]
    assert T.selection_steps(10, 50, 0.5) == [10]
    assert all(s > 50 for s in T.selection_steps(100, 7, 0.5))


# --------------------------------------------------------------------------------------------------- losses


def test_masked_loss_equals_brute_force_mean_over_masked_positions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator)
    targets = torch.randint(11, (3, 5), generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.5
    mask[0, 0] = True
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                expected += float(-torch.log_softmax(logits[b, t], -1)[targets[b, t]])
                count += 1
    assert float(T.masked_next_byte_loss(logits, targets, mask)) == pytest.approx(expected / count, rel=1e-5)
    with pytest.raises(ValueError, match="no answer bytes"):
        T.masked_next_byte_loss(logits, targets, torch.zeros_like(mask))


def test_check_finite_loss_raises_floating_point_error():
    T.check_finite_loss(torch.tensor(1.0), "stage", 3, "hint")
    with pytest.raises(FloatingPointError, match="step 3"):
        T.check_finite_loss(torch.tensor(float("nan")), "stage", 3, "lower lr")


def test_item_fits_counts_bytes_of_prompt_and_longest_choice():
    from lopkit.moe.data import MCItem

    item = MCItem("arithmetic", "abcd", (" x", " yyyy"), 0)
    assert T.item_fits(item, 8)  # 4 + 5 = 9 = context + 1
    assert not T.item_fits(item, 7)


# -------------------------------------------------------------------------------------------------- configs


def test_bad_pretrain_config_raises_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="k_pre"):
        T.MoEPretrain.make_config("smoke", {"k_pre": 9})  # smoke has 8 experts
    with pytest.raises(ConfigError, match="n_heads"):
        T.MoEPretrain.make_config("smoke", {"d_model": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="unknown config key"):
        T.MoEPretrain.make_config("smoke", {"experts": 4})
    with pytest.raises(ConfigError, match="no preset"):
        T.MoEPretrain.make_config("huge")


def test_bad_finetune_config_raises_config_error_with_a_fix(tmp_path):
    from lopkit.runner.execute import execute_run
    from lopkit.runner.store import ResultStore

    with pytest.raises(ConfigError, match="lopkit moe pretrain"):
        T.MoEFinetune.make_config("smoke")  # no init run
    base = {"init_store": "/nowhere", "init_run_id": "abc"}
    with pytest.raises(ConfigError, match="anchor_k needs k_schedule=multi"):
        T.MoEFinetune.make_config("smoke", {**base, "anchor_k": 1})
    with pytest.raises(ConfigError, match="per_k_norms needs"):
        T.MoEFinetune.make_config("smoke", {**base, "per_k_norms": True})
    with pytest.raises(ConfigError, match="k_train"):
        T.MoEFinetune.make_config("smoke", {**base, "k_schedule": "multi", "k_train": (2, 2)})
    config = T.MoEFinetune.make_config("smoke", {**base, "k_fixed": 3})
    with pytest.raises(ConfigError, match="k_pre=2"):
        config.check_against_model(k_pre=2, n_experts=8)
    with ResultStore(tmp_path) as store:  # the runner reads the pretrain state the finetune continues
        with pytest.raises(ConfigError, match="holds no results.sqlite"):
            execute_run(store, T.MoEFinetune, config, 0, progress="never")
        assert len(store.runs()) == 0
    with pytest.raises(ConfigError, match="initial_state"):  # the benchmark itself never opens a store
        T.MoEFinetune(config, 0)


def test_every_preset_builds_a_valid_pretrain_config():
    for preset in ("smoke", "mini", "default", "paper"):
        config = T.MoEPretrain.make_config(preset)
        model_config = T.model_config_from(config.model_values())
        assert model_config.k_pre == config.k_pre and model_config.n_experts == config.n_experts
    default = T.MoEPretrain.make_config("default")
    assert (default.d_model, default.n_layers, default.n_experts, default.k_pre, default.context) == (128, 4, 16, 4, 128)
    # spec 1.6: about 25M pretraining tokens
    assert 20e6 <= default.steps * default.batch_size * default.context <= 30e6


# --------------------------------------------------------------------------------------------- the benchmark


def test_nan_weights_make_pretraining_raise_floating_point_error():
    config = T.MoEPretrain.make_config("smoke", {"steps": 3})
    bench = T.MoEPretrain(config, 0)
    with torch.no_grad():
        bench.model.token_embedding.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="moe_pretrain"):
        bench.run(1)


def test_pretrain_state_roundtrip_continues_identically():
    config = T.MoEPretrain.make_config("smoke", {"steps": 6, "log_every": 2, "val_every": 3})
    straight = T.MoEPretrain(config, 3)
    rows_straight = straight.run(6)
    first = T.MoEPretrain(config, 3)
    rows = first.run(4)
    second = T.MoEPretrain(config, 3)
    second.load_state_dict(first.state_dict())
    rows += second.run(2)
    assert rows == rows_straight
    assert "optimizer" not in second.state_dict()  # a finished run keeps only what later stages need
    final = second.state_dict()
    model = T.model_from_state(final)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_pretrain_mix_fields_reach_the_corpus(monkeypatch):
    from lopkit.moe import pretrain as pretrain_module
    from lopkit.moe.data import PretrainCorpusConfig

    config = T.MoEPretrain.make_config("smoke", {"mix_arithmetic": 0.5, "mix_gcide": 0.0})
    mix = dict(config.mixture())
    assert set(mix) == set(PretrainCorpusConfig().mixture()) and mix["arithmetic"] == 0.5 and mix["gcide"] == 0.0
    seen = {}

    class Stop(Exception):
        pass

    def fake_corpus(data_seed, mixture):
        seen["mixture"] = dict(mixture)
        raise Stop

    monkeypatch.setattr(pretrain_module, "cached_corpus", fake_corpus)
    with pytest.raises(Stop):
        T.MoEPretrain(config, 0)
    assert seen["mixture"] == mix
    with pytest.raises(ConfigError, match="mix_kv"):
        T.MoEPretrain.make_config("smoke", {"mix_kv": -0.1})


def test_mc_item_rule_has_one_definition_shared_by_finetune_and_eval():
    import typing

    from lopkit.configs import run_identity
    from lopkit.moe.data import items
    from lopkit.moe.evaluate import MoEEval, MoEEvalConfig
    from lopkit.moe.finetune import MoEFinetuneConfig

    choices = typing.get_args(items.MCItemRule)
    assert items.MC_ITEM_RULE in choices
    configs = {MoEFinetuneConfig: (T.MoEFinetune, {"init_run_id": "r", "init_store": "/s"}),
               MoEEvalConfig: (MoEEval, {"source_run_id": "r", "source_store": "/s"})}
    errors = set()
    for config_cls, (bench, needed) in configs.items():
        assert typing.get_type_hints(config_cls)["mc_item_rule"] == items.MCItemRule
        config = bench.make_config("smoke", needed)
        assert config.mc_item_rule == items.MC_ITEM_RULE
        assert run_identity(config)["mc_item_rule"] == items.MC_ITEM_RULE  # part of the run id on purpose
        with pytest.raises(ConfigError) as info:
            bench.make_config("smoke", {**needed, "mc_item_rule": "answer_shortest"})
        errors.add(str(info.value))
    assert len(errors) == 1 and all(c in errors.pop() for c in choices)  # the same choices, the same message
