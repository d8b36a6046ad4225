"""Dial-k on tiny random transformers MoE models built offline (OLMoE, Qwen2-MoE, Mixtral): no download."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lopkit.moe import hf  # noqa: E402

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _build(family: str, k: int):
    """A tiny random model of ``family`` with 8 experts per layer and top-k = k (same weights for the same family)."""
    torch.manual_seed(0)
    if family == "olmoe":
        config = transformers.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=k)
        return transformers.OlmoeForCausalLM(config).eval()
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=k, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16)
        return transformers.Qwen2MoeForCausalLM(config).eval()
    config = transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=k)
    return transformers.MixtralForCausalLM(config).eval()


FAMILIES = ("olmoe", "qwen2_moe", "mixtral")
K_PRE = {"olmoe": 4, "qwen2_moe": 4, "mixtral": 2}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_k_pre_reproduces_the_original_outputs_exactly(family, tokens):
    model = _build(family, K_PRE[family])
    with torch.no_grad():
        original = model(input_ids=tokens).logits
        hf.set_top_k(model, 1)
        dialed_down = model(input_ids=tokens).logits
        assert hf.set_top_k(model, K_PRE[family]) == 1  # returns the previous k
        again = model(input_ids=tokens).logits
    assert not torch.equal(dialed_down, original)
    assert torch.equal(again, original)
    assert hf.pretrained_top_k(model) == K_PRE[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_dialed_k_equals_the_model_built_at_that_k(family, tokens):
    model = _build(family, K_PRE[family])
    routed = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: routed.append(out[2].shape[-1]))
             for r in hf.find_routers(model)]
    for k in (1, 3):
        reference = _build(family, k)
        reference.load_state_dict(model.state_dict())
        routed.clear()
        with torch.no_grad(), hf.dialed(model, k):
            got = model(input_ids=tokens).logits
            expected = reference(input_ids=tokens).logits
        assert routed and set(routed) == {k}  # every router picked exactly k experts per token
        assert torch.equal(got, expected)
    for hook in hooks:
        hook.remove()
    assert all(r.top_k == K_PRE[family] for r in hf.find_routers(model))  # the context manager restored k_pre


def test_k_above_k_pre_warns_and_bad_k_or_no_router_is_one_clear_error():
    model = _build("mixtral", 2)
    with pytest.warns(UserWarning, match="above the checkpoint's k_pre=2"):
        hf.set_top_k(model, 4)
    assert model.config.num_experts_per_tok == 4 and model.num_experts_per_tok == 4
    for bad in (0, 9, 2.5):
        with pytest.raises(hf.DialError, match=r"k must be an integer in 1\.\.8"):
            hf.set_top_k(model, bad)
    with pytest.raises(hf.DialError, match="no recognisable MoE router"):
        hf.set_top_k(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1)


def test_flop_proxy_grows_by_one_expert_per_layer_per_k():
    model = _build("olmoe", 4)
    per_expert = sum(p[0].numel() for layer in model.model.layers for p in layer.mlp.experts.parameters())
    assert hf.hf_flops_per_token(model, 3) - hf.hf_flops_per_token(model, 2) == pytest.approx(2 * per_expert)


def test_dial_table_on_a_saved_checkpoint(tmp_path):
    folder = tmp_path / "tiny-olmoe"
    _build("olmoe", 4).save_pretrained(folder)
    loaded = hf.load_dial_model(folder)
    assert loaded.kind == "hf" and loaded.k_pre == 4 and loaded.n_experts == 8
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("\n".join(json.dumps({"context": f"item {i}:", "choices": [" a", " bb", " c"], "answer": i % 3})
                                    for i in range(6)) + "\n")
    tasks = hf.load_mc_tasks(tasks_file)
    with pytest.warns(UserWarning, match="above"):
        rows = hf.dial_table(loaded, [1, 4, 8], "some text to score, " * 20, tasks, context_len=32, max_tokens=200)
    by_k = {row["k"]: row for row in rows}
    assert by_k[4]["token_agreement"] == 1.0 and by_k[4]["mc_agreement"] == 1.0
    assert by_k[1]["token_agreement"] < 1.0
    assert all(math.isfinite(row["perplexity"]) and 0 <= row["mc_acc"] <= 1 for row in rows)
    assert by_k[1]["flops_per_token"] < by_k[4]["flops_per_token"] < by_k[8]["flops_per_token"]
    table = hf.format_dial_table(loaded, rows)
    assert table.count("\n| ") == 4 and "k_pre=4" in table  # the header and one row per k


def test_paths_that_are_not_models_are_one_clear_error(tmp_path):
    with pytest.raises(hf.DialError, match="does not exist"):
        hf.load_dial_model(tmp_path / "missing")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(hf.DialError, match="is not a model"):
        hf.load_dial_model(junk)
    with pytest.raises(hf.DialError, match="is not a model"):
        hf.load_dial_model(tmp_path)  # a folder without config.json or results.sqlite
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).save_pretrained(dense)
    with pytest.raises(hf.DialError, match="no recognisable MoE router"):
        hf.load_dial_model(dense)


def test_dial_cli_prints_a_table_and_one_error_line_per_bad_input(tmp_path, capsys):
    from lopkit.moe.cli import main

    folder = tmp_path / "tiny-qwen"
    _build("qwen2_moe", 4).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("a short text to score with the tiny model. " * 10)
    assert main(["dial", str(folder), "--k", "2,4", "--text", str(text), "--context", "32"]) == 0
    out = capsys.readouterr().out
    assert "| k | perplexity" in out and out.count("\n| 2 |") == 1 and out.count("\n| 4 |") == 1
    for argv, needle in [([str(folder), "--k", "0,4"], "outside 1..8"),
                         ([str(folder), "--k", "9"], "outside 1..8"),
                         ([str(folder), "--k", "two"], "comma-separated"),
                         ([str(tmp_path / "nope"), "--k", "2"], "does not exist")]:
        assert main(["dial", *argv, "--text", str(text)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.mark.parametrize("family", FAMILIES)
def test_phds_soft_mask_router_patch(family, tokens):
    model = _build(family, K_PRE[family])
    with torch.no_grad():
        original = model(input_ids=tokens).logits
    k_pre = hf.enable_phds_routing(model, eps=0.0)
    assert k_pre == K_PRE[family]
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, original)  # k = k_pre: the unpatched model
        hf.set_phds_k(model, 1)
        soft = model(input_ids=tokens).logits
        hard = _build(family, 1)
        hard.load_state_dict(model.state_dict())
        expected = hard(input_ids=tokens).logits
    # eps = 0 zeroes ranks 1..k_pre-1: the same outputs as hard top-1 (renormalised only where the router does)
    assert torch.allclose(soft, expected, atol=1e-6) and not torch.allclose(soft, original, atol=1e-4)
    # eps > 0 keeps a gradient path into the experts ranked k..k_pre-1 (eps = 0 cuts it)
    reached = {}
    for eps in (0.0, 1e-6):
        hf.disable_phds_routing(model)
        hf.enable_phds_routing(model, eps=eps)
        hf.set_phds_k(model, 1)
        model.zero_grad()
        model(input_ids=tokens[:1, :1]).logits.sum().backward()  # one token: top-1 reaches 1 expert per layer
        stacks = [p for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters()]
        reached[eps] = sum(int(bool((p.grad[e] != 0).any())) for p in stacks for e in range(p.shape[0]))
    assert reached[1e-6] > reached[0.0] > 0
    with pytest.raises(hf.DialError, match=r"1\.\.k_pre"):
        hf.set_phds_k(model, K_PRE[family] + 1)
    hf.disable_phds_routing(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, original)
