"""MoE transformer: hard/soft routing against brute force, causality, per-k norms, aux loss and FLOPs."""

import math

import numpy as np
import pytest
import torch

from lopkit.configs import ConfigError, build_config
from lopkit.moe.model import (
    MODEL_PRESETS,
    MoEFeedForward,
    MoEModelConfig,
    MoETransformer,
    RMSNorm,
    load_balancing_loss,
    load_moe_state,
    rank_experts,
)

SMOKE = MODEL_PRESETS["smoke"]


def make_model(seed=0, **overrides):
    return MoETransformer.from_preset("smoke", seed=seed, **overrides)


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- brute-force references


def reference_moe_token(layer, h_row, k, normalize):
    """One token through one MoE layer: explicit softmax, explicit ranking, explicit SwiGLU per expert."""
    logits = layer.router.weight.detach().double() @ h_row.double()
    probs = torch.exp(logits - logits.max())
    probs = probs / probs.sum()
    order = np.argsort(-probs.numpy(), kind="stable")[:k]
    weights = probs[order]
    if normalize:
        weights = weights / weights.sum()
    hidden = layer.expert_hidden
    out = torch.zeros_like(h_row, dtype=torch.float64)
    for weight, e in zip(weights, order):
        w_gate = layer.w_gate_up[e, :, :hidden].detach().double()
        w_up = layer.w_gate_up[e, :, hidden:].detach().double()
        w_down = layer.w_down[e].detach().double()
        a = h_row.double() @ w_gate
        out += weight * (((a / (1 + torch.exp(-a))) * (h_row.double() @ w_up)) @ w_down)
    return out


def reference_model_logits(model, toks, k):
    """The whole hard top-k model written out token by token, in float64, with a masked-softmax attention."""
    cfg = model.config
    sd = {name: p.detach().double() for name, p in model.state_dict().items()}
    batch, length = toks.shape
    heads, dh = cfg.n_heads, cfg.d_model // cfg.n_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    x = sd["token_embedding.weight"][toks] + sd["position_embedding.weight"][:length]
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        a = rms(x, sd[p + "norm1.weight"])
        q, kk, v = (a @ sd[p + "attn.qkv.weight"].T).split(cfg.d_model, dim=-1)
        attended = torch.zeros_like(x)
        for b in range(batch):
            for t in range(length):
                for hd in range(heads):
                    sl = slice(hd * dh, (hd + 1) * dh)
                    scores = kk[b, : t + 1, sl] @ q[b, t, sl] / math.sqrt(dh)
                    attn = torch.softmax(scores, 0)
                    attended[b, t, sl] = attn @ v[b, : t + 1, sl]
        x = x + attended @ sd[p + "attn.out.weight"].T
        m = rms(x, sd[p + "norm2.weight"])
        per_token = [[reference_moe_token(block.moe, m[b, t].float(), k, cfg.norm_topk_prob) for t in range(length)]
                     for b in range(batch)]
        moe_out = torch.stack([torch.stack(row) for row in per_token])
        x = x + moe_out
    return rms(x, sd["final_norm.weight"]) @ sd["token_embedding.weight"].T


# ------------------------------------------------------------------------------------------------------ tests


def test_config_validation_rejects_bad_values():
    with pytest.raises(ConfigError, match="divisible"):
        build_config(MoEModelConfig, {"d_model": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="k_pre"):
        build_config(MoEModelConfig, {"k_pre": 17})
    with pytest.raises(ConfigError, match="dispatch"):
        build_config(MoEModelConfig, {"dispatch": "magic"})


@pytest.mark.parametrize("dispatch", ["loop", "padded"])
@pytest.mark.parametrize("normalize", [False, True])
def test_moe_layer_hard_topk_matches_per_token_reference(dispatch, normalize):
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 6, 8, dispatch)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    h = torch.randn(40, 16)
    for k in (1, 2, 3, 6):
        out, routing = layer(h, k, k_pre=3, soft=False, eps=1e-6, normalize=normalize)
        ref = torch.stack([reference_moe_token(layer, h[n], k, normalize) for n in range(h.shape[0])])
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        assert routing.topk_index.shape == (40, k)


@pytest.mark.parametrize("k, normalize", [(1, False), (3, False), (3, True)])
def test_whole_model_hard_topk_matches_brute_force(k, normalize):
    model = make_model(seed=3, norm_topk_prob=normalize)
    toks = tokens(2, 7)
    ref = reference_model_logits(model, toks, k)
    torch.testing.assert_close(model(toks, k).logits.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dispatch", ["loop", "padded"])
def test_hard_mode_computes_only_the_chosen_experts(monkeypatch, dispatch):
    import lopkit.moe.model as model_module

    model = make_model(dispatch=dispatch, k_pre=2)
    real_swiglu, real_bmm = model_module._swiglu, torch.bmm
    rows = []
    monkeypatch.setattr(model_module, "_swiglu", lambda x, a, b: (rows.append(x.shape[0]), real_swiglu(x, a, b))[1])
    monkeypatch.setattr(torch, "bmm", lambda a, b: (rows.append(a.shape[0] * a.shape[1]), real_bmm(a, b))[1])
    n_rows = {}
    for k, soft in ((1, False), (2, False), (4, False), (1, True)):
        rows.clear()
        model(tokens(2, 10), k, soft=soft)
        n_rows[(k, soft)] = sum(rows)
    n_tokens = 2 * 10 * model.config.n_layers
    if dispatch == "loop":  # exactly k expert evaluations per token
        assert [n_rows[(k, False)] for k in (1, 2, 4)] == [n_tokens, 2 * n_tokens, 4 * n_tokens]
    else:  # padded: at least k per token, at most one padded batch per expert
        for k in (1, 2, 4):
            assert k * n_tokens <= n_rows[(k, False)] / 2 <= model.config.n_experts * k * n_tokens
    # soft mode computes the k_pre ranked experts, whatever k is
    assert n_rows[(1, True)] == n_rows[(2, False)]


def test_soft_at_k_pre_equals_hard_at_k_pre():
    model = make_model()
    toks = tokens()
    k_pre = model.config.k_pre
    torch.testing.assert_close(model(toks, k_pre, soft=True).logits, model(toks, k_pre).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_soft_with_eps_zero_equals_hard(normalize):
    model = make_model(norm_topk_prob=normalize, k_pre=4)
    toks = tokens()
    for k in (1, 2, 3):
        soft = model(toks, k, soft=True, eps=0.0).logits
        torch.testing.assert_close(soft, model(toks, k).logits, rtol=1e-5, atol=1e-6)
        # and a visible eps changes the output (the eps experts really are computed)
        assert not torch.allclose(model(toks, k, soft=True, eps=0.1).logits, soft, atol=1e-6)


def test_changing_k_never_touches_weights():
    model = make_model()
    model.add_per_k_norms([1, 2])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for k in range(1, model.config.n_experts + 1):
        model(tokens(), k)
    for k in (1, 2):
        model(tokens(), k, soft=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bad_k_and_tokens_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="k must be"):
        model(tokens(), 0)
    with pytest.raises(ValueError, match="k must be"):
        model(tokens(), model.config.n_experts + 1)
    with pytest.raises(ValueError, match="soft mode needs k <= k_pre"):
        model(tokens(), model.config.k_pre + 1, soft=True)
    with pytest.raises(ValueError, match="context"):
        model(tokens(1, model.config.context + 1))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))


def test_eps_gradient_path_is_linear_in_eps_and_absent_at_zero():
    d, n_experts = 8, 5
    layer = MoEFeedForward(d, n_experts, 6)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        # a fixed ranking for every token: expert 0 first, 1 second, ...
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.arange(n_experts, 0, -1).float()
    h = torch.randn(30, d)
    h[:, 0] = 1.0
    probe = torch.randn(30, d)

    def expert_grads(eps):
        layer.zero_grad()
        out, routing = layer(h, 1, k_pre=3, soft=True, eps=eps, normalize=False)
        assert (routing.topk_index == 0).all()
        (out * probe).sum().backward()
        return layer.w_gate_up.grad.clone(), layer.w_down.grad.clone()

    g0 = expert_grads(0.0)
    g1 = expert_grads(1e-3)
    g2 = expert_grads(2e-3)
    for zero, small, double in zip(g0, g1, g2):
        # experts ranked 2nd and 3rd (eps slots): nothing at eps=0, exactly proportional to eps otherwise
        assert zero[1:3].abs().max() == 0
        assert small[1:3].abs().min(dim=-1).values.abs().max() > 0
        assert small[1:3].abs().max() > 1e-6
        torch.testing.assert_close(double[1:3], 2 * small[1:3], rtol=1e-4, atol=1e-10)
        # unranked experts never get a gradient; the active expert's does not depend on eps
        assert zero[3:].abs().max() == 0 and small[3:].abs().max() == 0
        torch.testing.assert_close(small[0], zero[0])


def test_eps_experts_get_gradient_in_the_whole_model():
    model = make_model(k_pre=3)
    toks = tokens(1, 3)  # 3 tokens at k=1: at most 3 of the 8 experts are active in a layer
    grads = {}
    for eps in (0.0, 1e-6):
        model.zero_grad()
        out = model(toks, 1, soft=True, eps=eps, return_details=True)
        out.logits.logsumexp(-1).mean().backward()
        ranked = [set(r.topk_index.unique().tolist()) for r in out.details]
        grads[eps] = [(b.moe.w_down.grad.flatten(1).abs().sum(1), ranked[i]) for i, b in enumerate(model.blocks)]
    for (g_zero, active), (g_eps, _) in zip(grads[0.0], grads[1e-6]):
        eps_only = [e for e in range(model.config.n_experts) if e not in active and g_eps[e] > 0]
        assert eps_only, "some expert should be reached only through eps slots"
        for e in eps_only:
            assert g_zero[e] == 0
            assert 0 < g_eps[e] < 1e-4  # eps-scaled


def test_causality():
    model = make_model()
    toks = tokens(2, 20)
    changed = toks.clone()
    t = 11
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 256
    for k, soft in ((1, False), (2, False), (1, True)):
        a = model(toks, k, soft=soft).logits
        b = model(changed, k, soft=soft).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_per_k_norms_start_equal_then_select_nearest_trained_k():
    model = make_model(k_pre=4)
    toks = tokens()
    n_experts = model.config.n_experts
    before = {k: model(toks, k).logits for k in range(1, n_experts + 1)}
    before_soft = {k: model(toks, k, soft=True).logits for k in range(1, 5)}
    model.add_per_k_norms([2, 3, 4])
    for k in range(1, n_experts + 1):
        torch.testing.assert_close(model(toks, k).logits, before[k], rtol=0, atol=0)
    for k in range(1, 5):
        torch.testing.assert_close(model(toks, k, soft=True).logits, before_soft[k], rtol=0, atol=0)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * model.config.n_layers + 1
    with torch.no_grad():
        for norm in norms:  # every norm's k=3 copy is used at k=3 (and its shared weight no longer is)
            norm.per_k["k3"].mul_(1.5)
            assert not torch.equal(model(toks, 3).logits, before[3])
            norm.per_k["k3"].div_(1.5)
            norm.weight.mul_(1.5)
            assert torch.equal(model(toks, 3).logits, before[3])
            norm.weight.div_(1.5)
        for norm in norms:
            norm.per_k["k3"].mul_(1.5)
    for k in range(1, n_experts + 1):
        same = torch.equal(model(toks, k).logits, before[k])
        assert same == (k != 3), f"k={k}: nearest trained k is {'3' if k == 3 else 'not 3'}"


def test_per_k_norm_ties_go_to_the_larger_k():
    model = make_model(k_pre=4)
    model.add_per_k_norms([2, 4])
    assert [model.norm_key(k) for k in (1, 2, 3, 4, 8)] == ["k2", "k2", "k4", "k4", "k4"]
    with pytest.raises(ValueError, match="already"):
        model.add_per_k_norms([3])


def test_state_dict_round_trip_with_per_k_norms():
    model = make_model(k_pre=4)
    model.add_per_k_norms([2, 3, 4])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "per_k"):
                for i, key in enumerate(sorted(module.per_k)):
                    module.per_k[key].add_(0.1 * (i + 1))
    state = model.state_dict()
    fresh = make_model(seed=99, k_pre=4)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)
    load_moe_state(fresh, state)
    assert fresh.per_k_norm_ks == (2, 3, 4)
    toks = tokens()
    for k in (1, 2, 3, 4, 6):
        assert torch.equal(fresh(toks, k).logits, model(toks, k).logits)


def numpy_switch_loss(probs, index, n_experts):
    probs, index = np.asarray(probs, dtype=np.float64), np.asarray(index)
    f = np.array([(index == e).sum() for e in range(n_experts)]) / index.size
    return n_experts * float(np.dot(f, probs.mean(axis=0)))


def test_load_balancing_loss_uniform_and_against_numpy():
    n_experts = 4
    uniform_probs = torch.full((8, n_experts), 1 / n_experts)
    round_robin = torch.tensor([[n % n_experts, (n + 1) % n_experts] for n in range(8)])
    assert math.isclose(float(load_balancing_loss(uniform_probs, round_robin, n_experts)), 1.0, rel_tol=1e-6)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 6, generator=gen) * 2, -1)
    index = rank_experts(probs, 2)[1]
    ours = float(load_balancing_loss(probs, index, 6))
    assert math.isclose(ours, numpy_switch_loss(probs, index, 6), rel_tol=1e-6)
    assert ours > 1.0  # routing concentrated by argmax is less balanced than uniform


def test_model_aux_loss_sums_layers_from_active_topk():
    model = make_model(k_pre=3)
    out = model(tokens(), 2, soft=True, return_details=True)
    expected = sum(
        numpy_switch_loss(r.router_probs.detach(), r.topk_index, model.config.n_experts) for r in out.details
    )
    assert all(r.topk_index.shape[1] == 2 for r in out.details)
    assert math.isclose(float(out.aux_loss.detach()), expected, rel_tol=1e-5)
    out.aux_loss.backward()
    assert model.blocks[0].moe.router.weight.grad.abs().sum() > 0


def test_rank_experts_breaks_ties_toward_lower_index():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert rank_experts(probs, 2)[1].tolist() == [[1, 2], [0, 1]]


def test_flops_per_token_is_linear_in_k_with_expert_slope():
    for preset in ("smoke", "default"):
        model = MoETransformer(build_config(MoEModelConfig, MODEL_PRESETS[preset]), seed=0)
        cfg = model.config
        per_expert_params = sum(p[0].numel() for p in (model.blocks[0].moe.w_gate_up, model.blocks[0].moe.w_down))
        slope = 2 * per_expert_params * cfg.n_layers
        flops = np.array([model.flops_per_token(k) for k in range(1, cfg.n_experts + 1)])
        assert np.allclose(np.diff(flops), slope)
        # k=1: 2 x (weights a token multiplies: all but unused experts, positions, norms) + full-context attention
        touched = model.num_parameters() - (cfg.n_experts - 1) * per_expert_params * cfg.n_layers
        touched -= cfg.context * cfg.d_model + cfg.n_layers * 2 * cfg.d_model + cfg.d_model  # positions and norms
        assert flops[0] == pytest.approx(2 * touched + 2 * cfg.n_layers * 2 * cfg.context * cfg.d_model)


def test_parameter_count_and_seeded_init():
    model = make_model(seed=5)
    cfg = model.config
    d, e, h = cfg.d_model, cfg.n_experts, cfg.expert_hidden
    per_layer = 4 * d * d + 2 * d + d * e + e * 3 * d * h
    assert model.num_parameters() == cfg.vocab_size * d + cfg.context * d + cfg.n_layers * per_layer + d
    again = make_model(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_from_preset_builds_the_preset_size_and_rejects_unknown_presets():
    from lopkit.configs import ConfigError

    model = MoETransformer.from_preset("smoke", seed=3, k_pre=1)
    assert model.config.d_model == MODEL_PRESETS["smoke"]["d_model"] and model.config.k_pre == 1
    same = MoETransformer.from_preset("smoke", seed=3, k_pre=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ConfigError, match="unknown model preset"):
        MoETransformer.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown config key"):
        MoETransformer.from_preset("smoke", widht=3)
