"""PHDS fine-tuning of tiny random transformers MoE models (OLMoE, Qwen2-MoE, Mixtral), built offline: no download."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lopkit.configs import ConfigError  # noqa: E402
from lopkit.moe import hf, hf_phds  # noqa: E402
from lopkit.moe.training import _DATA_KEY, lr_at, make_optimizer  # noqa: E402
from lopkit.seeding import seeded_generator  # noqa: E402

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "router_aux_loss_coef": 0.05}
FAMILIES = ("olmoe", "qwen2_moe", "mixtral")
K_PRE = {"olmoe": 4, "qwen2_moe": 4, "mixtral": 4}


def _build(family: str, k: int | None = None):
    """A tiny random model of ``family`` with 8 experts per layer and top-k = k (same weights for the same family)."""
    k = K_PRE[family] if k is None else k
    torch.manual_seed(0)
    if family == "olmoe":
        return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=k))
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=k, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=16)
        return transformers.Qwen2MoeForCausalLM(config)
    config = transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=k)
    return transformers.MixtralForCausalLM(config)


@pytest.fixture(scope="module")
def rows():
    return torch.randint(3, VOCAB, (12, 10), generator=torch.Generator().manual_seed(1))


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_change_the_weights_and_restore_plain_routing(family, rows):
    model = _build(family)
    before = _weights(model)
    config = {"steps": 3, "batch_size": 4, "lr": 1e-3, "k_train": (2, 3, 4)}
    history = hf_phds.phds_finetune(model, rows, config, seed=3)
    assert [r["step"] for r in history] == [1, 2, 3] and all(r["k"] in (2, 3, 4) for r in history)
    assert all(math.isfinite(r["loss"]) and r["aux_loss"] > 0 for r in history)
    after = _weights(model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("experts" in name for name in changed) and any(name.endswith("gate.weight") for name in changed)
    # the routers run their own top-k again, at k_pre, and the model is in eval mode
    assert all(not hasattr(r, "_lopkit_phds") and r.top_k == K_PRE[family] for r in hf.find_routers(model))
    assert not model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_eps0_at_fixed_k_pre_equals_plain_finetuning_with_the_models_own_aux_loss(family, rows):
    """At eps=0 and K_train={k_pre} every step is transformers' own causal-LM loss (cross-entropy + the model's
    router_aux_loss_coef x its load-balancing loss at num_experts_per_tok=k_pre) with the same optimiser and batches."""
    steps, batch_size, lr = 3, 4, 1e-3
    model = _build(family)
    reference = copy.deepcopy(model)
    hf_phds.phds_finetune(model, rows, {"steps": steps, "batch_size": batch_size, "lr": lr, "eps": 0.0,
                                         "k_train": (K_PRE[family],), "grad_clip": 0.0}, seed=7)
    reference.train()
    optimizer = make_optimizer(reference, lr, 0.0)
    data = seeded_generator(7, _DATA_KEY)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, 0, 0.1)
        batch = rows[torch.randint(rows.shape[0], (batch_size,), generator=data)]
        loss = reference(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    got, expected = _weights(model), _weights(reference)
    assert got.keys() == expected.keys()
    worst = max(float((got[n] - expected[n]).abs().max()) for n in got)
    assert worst < 1e-5, worst
    assert any(not torch.equal(expected[n], v) for n, v in _weights(_build(family)).items())  # it did train


def test_load_balancing_loss_by_hand_and_against_transformers():
    # two layers x two tokens, three experts; logits = log p, so the router probabilities are these rows
    probs = [torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]), torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])]
    logits = tuple(p.log() for p in probs)
    # pooled mean probability P = (1.4, 1.3, 1.3) / 4
    # k=1: top-1 experts 0, 1, 0, 2 -> counts (2, 1, 1) / 4 tokens -> 3 * (.5*.35 + .25*.325 + .25*.325) = 1.0125
    # k=2: top-2 {0,1}, {1,2}, {0,1}, {2,1} -> counts (2, 4, 2) / 4 -> 3 * (.5*.35 + 1*.325 + .5*.325) = 1.9875
    for k, by_hand in ((1, 1.0125), (2, 1.9875)):
        assert float(hf_phds.mixtral_load_balancing_loss(logits, 3, k)) == pytest.approx(by_hand, abs=1e-6)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    random_logits = tuple(torch.randn(10, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    for k in (1, 2, 5):
        assert float(hf_phds.mixtral_load_balancing_loss(random_logits, 8, k)) == pytest.approx(
            float(load_balancing_loss_func(random_logits, 8, k)), rel=1e-6)


def test_the_step_loss_uses_the_sampled_k(rows, monkeypatch):
    seen = []
    original = hf_phds.mixtral_load_balancing_loss

    def spy(router_logits, n_experts, k):
        value = original(router_logits, n_experts, k)
        seen.append((k, float(value.detach()), float(original(router_logits, n_experts, 4).detach())))
        return value

    monkeypatch.setattr(hf_phds, "mixtral_load_balancing_loss", spy)
    model = _build("olmoe")
    trainer = hf_phds.HfPhdsTrainer(model, rows, {"steps": 8, "batch_size": 4, "k_train": (1, 2, 4)}, seed=0)
    masks = []
    hooks = [r.register_forward_pre_hook(lambda m, _a: masks.append(m._lopkit_phds[1])) for r in hf.find_routers(model)]
    history = trainer.run(8)
    for hook in hooks:
        hook.remove()
    assert [k for k, _v, _v4 in seen] == [r["k"] for r in history]
    assert masks == [r["k"] for r in history for _ in range(2)]  # both layers' soft masks at the step's k
    assert {r["k"] for r in history} >= {1, 4}  # the sampled k varies
    for (k, value, at_k_pre), record in zip(seen, history):
        assert value == pytest.approx(record["aux_loss"])
        assert (value == at_k_pre) == (k == 4)  # another k gives another loss
        assert record["loss"] == pytest.approx(record["lm_loss"] + 0.05 * value, rel=1e-6)  # the model's coefficient


def test_anchor_phase_moves_all_mass_to_the_anchor_k(rows):
    model = _build("qwen2_moe")
    # K_train = {1, 2} leaves k_pre=4 out: k_pre appears only through the anchor phase (the last 4 of 12 steps)
    config = {"steps": 12, "batch_size": 2, "k_train": (1, 2), "anchor_k": 4, "anchor_fraction": 1 / 3}
    trainer = hf_phds.HfPhdsTrainer(model, rows, config, seed=1)
    assert [trainer.k_probabilities(t).get(4, 0.0) for t in range(12)] == pytest.approx(
        [0.0] * 8 + [0.25, 0.5, 0.75, 1.0])
    history = trainer.run(12)
    ks = [r["k"] for r in history]
    assert set(ks[:8]) <= {1, 2} and ks[-1] == 4
    # without the curriculum the same seed never trains at k_pre
    plain = hf_phds.HfPhdsTrainer(_build("qwen2_moe"), rows, {**config, "anchor_k": None}, seed=1)
    assert 4 not in [r["k"] for r in plain.run(12)]


@pytest.mark.parametrize("family", ("qwen2_moe", "mixtral"))
def test_resume_from_a_saved_state_gives_the_uninterrupted_weights(family, rows, tmp_path):
    config = {"steps": 6, "batch_size": 3, "lr": 1e-3, "anchor_k": 3, "anchor_fraction": 0.5, "per_k_norms": True}
    whole = hf_phds.HfPhdsTrainer(_build(family), rows, config, seed=4)
    whole.run(6)
    first = hf_phds.HfPhdsTrainer(_build(family), rows, config, seed=4)
    first.run(3)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = hf_phds.HfPhdsTrainer(_build(family), rows, config, seed=4)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    second.run(10)  # never past config.steps
    assert second.step == 6 and [r["k"] for r in second.history] == [r["k"] for r in whole.history]
    a, b = _weights(whole.model), _weights(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    other_seed = hf_phds.HfPhdsTrainer(_build(family), rows, config, seed=5)
    with pytest.raises(ConfigError, match="another seed or model"):
        other_seed.load_state_dict(first.state_dict())


def _trained_digest(seed: int) -> str:
    """SHA-256 of the weights of a tiny Mixtral after 4 PHDS steps with ``seed`` (one intra-op thread)."""
    import hashlib

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = torch.randint(3, VOCAB, (12, 10), generator=torch.Generator().manual_seed(1))
        model = _build("mixtral")
        hf_phds.phds_finetune(model, rows, {"steps": 4, "batch_size": 3, "lr": 1e-3, "anchor_k": 3}, seed=seed)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_two_processes_with_the_same_seed_give_the_same_weights(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from test_moe_hf_phds import _trained_digest\nprint(_trained_digest(int(sys.argv[1])))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "11"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    child = done.stdout.strip().splitlines()[-1]
    assert child == _trained_digest(11)  # this process, the same seed
    assert child != _trained_digest(12)


def test_per_k_norms_train_their_own_copies_and_are_saved_with_the_model(rows, tmp_path):
    model = _build("olmoe")
    shared_before = {n: v.clone() for n, v in model.state_dict().items() if n.endswith("norm.weight")}
    trainer = hf_phds.HfPhdsTrainer(model, rows, {"steps": 4, "batch_size": 3, "lr": 1e-2, "k_train": (2, 4),
                                                  "per_k_norms": True}, seed=2)
    assert hf.per_k_norm_ks(model) == (2, 4)
    trainer.run(4)
    trained_ks = {r["k"] for r in trainer.history}
    state = model.state_dict()
    for name, before in shared_before.items():
        assert torch.equal(state[name], before)  # the shared norms get no gradient
        for k in trained_ks:
            assert not torch.equal(state[name[: -len("weight")] + f"lopkit_per_k.k{k}"], before)
    trainer.finish()
    tokens = rows[:2]
    with torch.no_grad():
        at = {4: model(input_ids=tokens).logits.clone()}
        hf.set_top_k(model, 2)
        at[2] = model(input_ids=tokens).logits.clone()
        hf.set_top_k(model, 4)
    hf_phds.save_phds_model(trainer, tmp_path / "tuned")
    summary = json.loads((tmp_path / "tuned" / hf_phds.SUMMARY_FILE).read_text())
    assert summary["per_k_norm_ks"] == [2, 4] and len(summary["history"]) == 4
    loaded = hf.load_dial_model(tmp_path / "tuned")  # adds the per-k norms from lopkit_per_k_norms.pt
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tuned")).eval()  # shared = k_pre's copy
    for k in (2, 4):
        assert torch.allclose(loaded.logits(tokens, k), at[k], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=tokens).logits, at[4], atol=1e-6)
    assert not torch.allclose(at[2], at[4])


def test_bad_input_is_one_clear_error(rows):
    with pytest.raises(ConfigError, match="k=5 does not fit the model"):
        hf_phds.HfPhdsTrainer(_build("olmoe"), rows, {"steps": 2, "k_train": (2, 5)})
    with pytest.raises(ConfigError, match="k=9 does not fit"):
        hf_phds.HfPhdsTrainer(_build("olmoe"), rows, {"steps": 2, "anchor_k": 9})
    with pytest.raises(ConfigError, match="steps must be"):
        hf_phds.HfPhdsTrainer(_build("olmoe"), rows, {"steps": 0})
    with pytest.raises(ConfigError, match="unknown|k_trian"):
        hf_phds.HfPhdsTrainer(_build("olmoe"), rows, {"k_trian": (2,)})
    with pytest.raises(hf.DialError, match="no recognisable MoE router"):
        hf_phds.HfPhdsTrainer(torch.nn.Sequential(torch.nn.Linear(4, 4)), rows, {"steps": 2})
    with pytest.raises(ConfigError, match="token ids must lie in 0..299"):
        hf_phds.HfPhdsTrainer(_build("olmoe"), rows + 1000, {"steps": 2})
    with pytest.raises(ConfigError, match="at least 2"):
        hf_phds.text_rows([5], 16)
    assert hf_phds.text_rows(list(range(10)), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_finetune_hf_cli_trains_saves_resumes_and_gives_one_error_line_per_bad_input(tmp_path, capsys):
    from lopkit.moe.cli import main

    folder = tmp_path / "tiny-mixtral"
    _build("mixtral").save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("a short text for the tiny model to fine-tune on. " * 12)
    out = tmp_path / "tuned"
    argv = ["finetune-hf", str(folder), "--data", str(text), "--steps", "4", "--out", str(out), "--context", "24",
            "--batch-size", "2", "--k-train", "2,3,4", "--anchor-k", "2", "--save-every", "3", "--threads", "1"]
    assert main(argv) == 0
    assert "fine-tuned tiny-mixtral" in capsys.readouterr().out
    summary = json.loads((out / hf_phds.SUMMARY_FILE).read_text())
    assert summary["steps_done"] == 4 and summary["history"][-1]["k"] == 2  # the anchor at the last step
    tuned = hf.load_dial_model(out)
    assert tuned.k_pre == 4 and any(not torch.equal(a, b) for a, b in zip(
        tuned.model.state_dict().values(), _build("mixtral").state_dict().values()))
    assert main(argv) == 0  # rerun: the finished state is found, nothing is trained again
    assert "resuming" in capsys.readouterr().err
    assert json.loads((out / hf_phds.SUMMARY_FILE).read_text())["history"] == summary["history"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).save_pretrained(dense)
    base = ["--steps", "2", "--out", str(tmp_path / "o")]
    for args, needle in [([str(folder), "--data", str(text), "--k-train", "2,9"], "k=9 does not fit"),
                         ([str(folder), "--data", str(text), "--anchor-k", "0"], "anchor_k must be >= 1"),
                         ([str(tmp_path / "nope"), "--data", str(text)], "does not exist"),
                         ([str(text), "--data", str(text)], "is not a model"),
                         ([str(dense), "--data", str(text)], "no recognisable MoE router"),
                         ([str(folder), "--data", str(empty)], "holds no text"),
                         ([str(folder), "--data", str(tmp_path / "missing.txt")], "not found")]:
        assert main(["finetune-hf", *args, *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_finetune_hf_cli_resumes_an_interrupted_run_to_the_uninterrupted_weights(tmp_path, capsys):
    from lopkit.configs import build_config
    from lopkit.moe.cli import main

    folder = tmp_path / "tiny-olmoe"
    _build("olmoe").save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")  # a tokenizer file travels with the fine-tuned model
    text = tmp_path / "text.txt"
    text.write_text("resume me exactly where I stopped, please. " * 12)
    flags = ["--data", str(text), "--steps", "4", "--context", "24", "--batch-size", "2", "--k-train", "2,4",
             "--anchor-k", "3", "--anchor-fraction", "0.5", "--per-k-norms", "--seed", "9", "--lr", "1e-3"]
    assert main(["finetune-hf", str(folder), *flags, "--out", str(tmp_path / "whole")]) == 0
    # the state an interrupted CLI run leaves after 2 steps (same text rows, config and seed)
    loaded = hf.load_dial_model(folder)
    config = build_config(hf_phds.HfPhdsConfig, {"steps": 4, "batch_size": 2, "k_train": "2,4", "anchor_k": 3,
                                                 "anchor_fraction": 0.5, "per_k_norms": True, "lr": 1e-3})
    trainer = hf_phds.HfPhdsTrainer(loaded.model, hf_phds.text_rows(loaded.encode(text.read_text()), 24), config, 9)
    trainer.run(2)
    (tmp_path / "resumed").mkdir()
    torch.save(trainer.state_dict(), tmp_path / "resumed" / hf_phds.STATE_FILE)
    capsys.readouterr()
    assert main(["finetune-hf", str(folder), *flags, "--out", str(tmp_path / "resumed")]) == 0
    assert "at step 2 of 4" in capsys.readouterr().err
    whole, resumed = (hf.load_dial_model(tmp_path / name).model.state_dict() for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert any(".lopkit_per_k.k3" in n for n in whole)
    assert (tmp_path / "resumed" / "tokenizer_config.json").is_file()
    # another seed cannot resume this state: one error line, the saved state is kept
    assert main(["finetune-hf", str(folder), *flags[:-4], "--seed", "8", "--lr", "1e-3",
                 "--out", str(tmp_path / "resumed")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another seed or model" in err[0]
    assert (tmp_path / "resumed" / hf_phds.STATE_FILE).is_file()
