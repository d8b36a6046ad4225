"""Tests of noisy_sgd and shrink_perturb: noise statistics against closed forms, schedules, resumability."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lopkit.configs import ConfigError, build_config
from lopkit.mitigations.perturbation import (
    MethodGenerator,
    NoisySGD,
    ShrinkPerturb,
    noise_scale,
    shrink_perturb_,
)
from lopkit.mitigations.registry import get_method


def sgd(model: nn.Module) -> torch.optim.SGD:
    """A throwaway optimizer (the hooks only need one to exist)."""
    return torch.optim.SGD(model.parameters(), lr=0.1)


def relative_noise_draws(
    method: NoisySGD, model: nn.Module, grads: list[torch.Tensor], steps: int
) -> list[list[np.ndarray]]:
    """Call before_step ``steps`` times with fixed gradients; return the added noise of each parameter per step."""
    draws = []
    for step in range(steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        method.before_step(model, None, step)
        draws.append([(p.grad - g).double().numpy() for p, g in zip(model.parameters(), grads)])
    return draws


def fixed_grad_model(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """A model with one large weight (std estimates are tight) and fixed, very different gradient norms."""
    torch.manual_seed(seed)
    model = nn.Linear(200, 100)
    grads = [torch.randn(100, 200) * 3.0, torch.randn(100) * 0.01]
    return model, grads


# ---------------------------------------------------------------------------------------------- noisy SGD


def test_noise_scale_schedule_including_zero_to_the_zero():
    assert noise_scale(0.01, 0.0, 0) == 0.01  # 0**0 = 1: the first step is noisy
    assert noise_scale(0.01, 0.0, 1) == 0.0
    assert noise_scale(0.02, 0.9, 5) == pytest.approx(0.02 * 0.9**5)
    assert noise_scale(0.05, 1.0, 10_000) == 0.05


def test_noisy_sgd_noise_std_relative_to_gradient_norm_follows_sigma_t():
    model, grads = fixed_grad_model()
    method = NoisySGD(NoisySGD.Config(sigma0=0.05, decay=0.8, seed=3))
    method.attach(model, sgd(model))
    draws = relative_noise_draws(method, model, grads, steps=6)
    for t, noises in enumerate(draws):
        sigma_t = 0.05 * 0.8**t
        for noise, grad in zip(noises, grads):
            norm = float(torch.linalg.vector_norm(grad.double()))
            assert abs(noise.mean()) < 4 * sigma_t * norm / math.sqrt(noise.size)
            # the std of a 20k-sample estimate is within ~0.5% of the truth (5% for the 100 biases)
            tolerance = 0.03 if noise.size > 1000 else 0.25
            assert noise.std() / norm == pytest.approx(sigma_t, rel=tolerance)
    # pooled over the 6 steps, the standardised weight noise is Gaussian
    weight_norm = np.linalg.norm(grads[0].double().numpy())
    pooled = np.concatenate([d[0].ravel() / (0.05 * 0.8**t * weight_norm) for t, d in enumerate(draws)])
    assert stats.kstest(pooled, "norm").pvalue > 1e-3


def test_noisy_sgd_uses_each_tensors_own_gradient_norm():
    model, grads = fixed_grad_model()
    method = NoisySGD(NoisySGD.Config(sigma0=0.1, decay=1.0, seed=0))
    method.attach(model, sgd(model))
    weight_noise, bias_noise = relative_noise_draws(method, model, grads, steps=1)[0]
    ratio = weight_noise.std() / bias_noise.std()
    expected = float(grads[0].norm() / grads[1].norm())
    assert ratio == pytest.approx(expected, rel=0.25)


def test_noisy_sgd_decay_zero_perturbs_only_the_first_step():
    model, grads = fixed_grad_model()
    method = get_method("noisy_sgd", {"sigma0": "0.01", "decay": "0"})
    method.attach(model, sgd(model))
    draws = relative_noise_draws(method, model, grads, steps=4)
    assert np.abs(draws[0][0]).max() > 0
    for noises in draws[1:]:
        assert all(np.all(n == 0) for n in noises)


def test_noisy_sgd_restart_each_task_resets_the_schedule():
    model, grads = fixed_grad_model()
    method = NoisySGD(NoisySGD.Config(sigma0=0.01, decay=0.0, restart_each_task=True, seed=0))
    method.attach(model, sgd(model))
    relative_noise_draws(method, model, grads, steps=3)
    method.on_task_start(model, None, 1)
    again = relative_noise_draws(method, model, grads, steps=2)
    assert np.abs(again[0][0]).max() > 0 and np.all(again[1][0] == 0)


def test_noisy_sgd_state_dict_round_trip_reproduces_the_noise_sequence():
    model, grads = fixed_grad_model()
    method = NoisySGD(NoisySGD.Config(sigma0=0.02, decay=0.99))  # seed=None: drawn from the global RNG
    torch.manual_seed(123)
    method.attach(model, sgd(model))
    relative_noise_draws(method, model, grads, steps=3)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    expected = relative_noise_draws(method, model, grads, steps=3)

    resumed = NoisySGD(NoisySGD.Config(sigma0=0.02, decay=0.99))
    torch.manual_seed(999)  # a different global state must not matter after load_state_dict
    resumed.attach(model, sgd(model))
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.t == 3
    got = relative_noise_draws(resumed, model, grads, steps=3)
    for a, b in zip(expected, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_noisy_sgd_unseeded_noise_follows_the_run_seed_not_the_global_rng():
    model, grads = fixed_grad_model()

    def first_noise(run_seed: int, global_seed: int) -> np.ndarray:
        method = NoisySGD()
        method.seed_from_run(run_seed)
        torch.manual_seed(global_seed)
        method.attach(model, sgd(model))
        return relative_noise_draws(method, model, grads, steps=1)[0][0]

    np.testing.assert_array_equal(first_noise(1, 0), first_noise(1, 7))
    assert not np.array_equal(first_noise(1, 0), first_noise(2, 0))


@pytest.mark.parametrize(
    "overrides, match",
    [({"sigma0": -0.1}, "sigma0"), ({"sigma0": float("nan")}, "sigma0"), ({"decay": 1.5}, "decay"),
     ({"decay": -0.1}, "decay"), ({"seed": -1}, "seed")],
)  # fmt: skip
def test_noisy_sgd_bad_hyper_parameters_raise(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(NoisySGD.Config, overrides)


# ---------------------------------------------------------------------------------------------- shrink & perturb


def test_shrink_without_noise_is_exact_scaling_and_leaves_norm_layers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.fill_(1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shrink_perturb_(model, shrink=0.7, sigma=0.0, noise="init", generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        factor = 1.0 if name.startswith("1.") else 0.7
        torch.testing.assert_close(p.detach(), before[name] * factor)


@pytest.mark.parametrize("layer", [nn.Linear(300, 400), nn.Conv2d(12, 40, kernel_size=5)])
def test_perturbation_noise_follows_the_pytorch_default_init_law(layer):
    fan_in = layer.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)
    method = ShrinkPerturb(ShrinkPerturb.Config(shrink=0.5, sigma=2.0, seed=1))
    old = layer.weight.detach().clone()
    method.attach(layer, sgd(layer))
    method.after_step(layer, None, 0)
    residual = ((layer.weight.detach() - 0.5 * old) / 2.0).double().numpy().ravel()
    assert np.abs(residual).max() <= bound * (1 + 1e-5)
    assert residual.var() == pytest.approx(bound**2 / 3, rel=0.03)  # variance of U(-b, b)
    assert stats.kstest(residual, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 1e-3


def test_perturbation_noise_kaiming_option_is_he_normal():
    layer = nn.Linear(250, 400)
    method = ShrinkPerturb(ShrinkPerturb.Config(shrink=0.9, sigma=0.5, noise="kaiming", seed=2))
    old_w, old_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    method.attach(layer, sgd(layer))
    method.after_step(layer, None, 0)
    std = math.sqrt(2 / 250)
    residual = ((layer.weight.detach() - 0.9 * old_w) / 0.5).double().numpy().ravel()
    assert residual.std() == pytest.approx(std, rel=0.02)
    assert stats.kstest(residual / std, "norm").pvalue > 1e-3
    bias_residual = ((layer.bias.detach() - 0.9 * old_b) / 0.5).double().numpy()
    assert bias_residual.std() == pytest.approx(std, rel=0.25)


def test_shrink_perturb_every_and_when_schedules():
    model = nn.Linear(3, 2)
    every_third = ShrinkPerturb(ShrinkPerturb.Config(every=3, seed=0))
    every_third.attach(model, sgd(model))
    for step in range(7):
        every_third.after_step(model, None, step)
        every_third.on_task_start(model, None, step)  # ignored with when=step
    assert every_third.applications == 2

    per_task = get_method("shrink_perturb", {"when": "task"})
    assert (per_task.shrink, per_task.sigma) == (0.4, 0.1)
    per_task.attach(model, sgd(model))
    weight = model.weight.detach().clone()
    per_task.on_task_start(model, None, 0)  # the fresh network is left alone on task 0
    per_task.after_step(model, None, 0)  # ignored with when=task
    torch.testing.assert_close(model.weight.detach(), weight)
    per_task.on_task_start(model, None, 1)
    assert per_task.applications == 1
    first = ShrinkPerturb(ShrinkPerturb.Config(when="task", first_task=True, seed=0))
    first.attach(model, sgd(model))
    first.on_task_start(model, None, 0)
    assert first.applications == 1


def test_shrink_perturb_step_defaults_are_the_continual_literature_values():
    method = ShrinkPerturb()
    assert method.shrink == pytest.approx(1 - 1e-4) and method.sigma == pytest.approx(1e-2)


def test_shrink_perturb_state_dict_round_trip_reproduces_the_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    method = ShrinkPerturb(ShrinkPerturb.Config(every=2))
    method.attach(model, sgd(model))
    for step in range(3):
        method.after_step(model, None, step)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = method.state_dict()
    for step in range(3, 8):
        method.after_step(model, None, step)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)
    resumed = ShrinkPerturb(ShrinkPerturb.Config(every=2))
    resumed.attach(model, sgd(model))
    model.load_state_dict(saved_model)
    resumed.load_state_dict(saved)
    for step in range(3, 8):
        resumed.after_step(model, None, step)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, match",
    [({"shrink": 0.0}, "shrink"), ({"shrink": 1.2}, "shrink"), ({"sigma": -1.0}, "sigma"),
     ({"every": 0}, "every"), ({"when": "epoch"}, "when"), ({"noise": "xavier"}, "noise")],
)  # fmt: skip
def test_shrink_perturb_bad_hyper_parameters_raise(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(ShrinkPerturb.Config, overrides)


def test_method_generator_saves_nothing_before_its_first_draw():
    generator = MethodGenerator()
    assert generator.state_dict()["state"] is None
    generator.load_state_dict(generator.state_dict())
    assert generator.get().device.type == "cpu"
