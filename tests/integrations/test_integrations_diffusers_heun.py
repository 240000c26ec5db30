"""diffmath.integrations.diffusers: HeunDiscreteScheduler against diffusers' own class (its
float32 error), the core solver sample_heun it steps with, a seeded pipeline-style loop with a
small local UNet2DModel, and the exact Gaussian oracle."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.samplers import sample_heun  # noqa: E402
from tests.integrations.test_integrations_diffusers_sigma import (  # noqa: E402
    DATA,
    SHAPE,
    TOL_SIGMA_MIN,
    TOL_STEP,
    oracle_output,
    rel,
    tiny_unet,
)


def test_config_keys_defaults_and_round_trips(tmp_path):
    ours, theirs = dm.HeunDiscreteScheduler, diffusers.HeunDiscreteScheduler
    po = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    assert list(po) == list(pt)
    assert {k: v.default for k, v in po.items()} == {k: v.default for k, v in pt.items()}
    assert ours.order == theirs.order == 2
    cfg = dict(
        prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule="scaled_linear", clip_sample=True
    )
    a = ours(**cfg)
    b = theirs.from_config(a.config)
    c = ours.from_config(theirs(**cfg).config)
    assert dict(b.config) == dict(theirs(**cfg).config)
    assert type(c) is ours and dict(c.config) == dict(a.config)
    a.save_pretrained(tmp_path)
    assert type(theirs.from_pretrained(tmp_path)) is theirs
    assert type(ours.from_pretrained(tmp_path)) is ours
    assert "HeunDiscreteScheduler" in ours._compatibles


HEUN_CASES = [
    (dict(), 10),
    (dict(timestep_spacing="leading", steps_offset=1), 25),
    (dict(timestep_spacing="trailing", prediction_type="v_prediction"), 7),
    # with x0-prediction the step to sigma_min is D + (sigma_min / sigma)(x - D) with x - D of
    # the order of x: diffusers' float32 sigma_min (7.5e-5 relative off) shows (observed 1.4e-5)
    (dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5), 10, TOL_SIGMA_MIN),
    # diffusers' float32 cumprod of 1000 equal betas is 1.4e-5 off at t = 999 (sigma_max
    # 403.42209 against sqrt(e^12 - 1) = 403.42755)
    (dict(beta_schedule="exp"), 10, TOL_SIGMA_MIN),
    (dict(beta_schedule="squaredcos_cap_v2"), 10, 5e-4),  # diffusers' float32 cosine betas
    (dict(use_karras_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_exponential_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_beta_sigmas=True), 12, TOL_SIGMA_MIN),
]


@pytest.mark.parametrize("case", HEUN_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_each_half_step_matches_diffusers(case):
    config, steps, tol = (*case, TOL_STEP)[:3]
    ours, theirs = dm.HeunDiscreteScheduler(**config), diffusers.HeunDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert len(ours.timesteps) == len(theirs.timesteps) == 2 * steps - 1
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    assert torch.allclose(ours.timesteps, theirs.timesteps, rtol=1e-4, atol=1e-3)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=5e-4, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=tol)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * float(theirs.init_noise_sigma)
    for t in ours.timesteps:
        assert ours.state_in_first_order == theirs.state_in_first_order
        m = torch.randn(SHAPE, generator=g)
        assert rel(ours.scale_model_input(x, t), theirs.scale_model_input(x, t)) < tol
        a = ours.step(m, t, x)
        b = theirs.step(m, t, x)
        assert a.prev_sample.dtype == b.prev_sample.dtype
        assert rel(a.prev_sample, b.prev_sample) < tol
        assert rel(a.pred_original_sample, b.pred_original_sample) < tol
        x = b.prev_sample  # both continue from the same state


def test_loop_is_the_core_solver():
    """The adapter's 2N - 1 calls, driven by a denoiser, are sample_heun on the adapter's float64
    ladder, bit for bit in float64."""
    sched = dm.HeunDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(8)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * float(
        sched.init_noise_sigma
    )
    x, calls = x0.clone(), []
    for k, t in enumerate(sched.timesteps):
        calls.append(float(sched._sig[k]))
        x = sched.step(torch.as_tensor(DATA.denoise(x.numpy(), float(sched._sig[k]))), t, x).prev_sample
    seen = []
    want = sample_heun(lambda y, s: seen.append(float(s[0])) or DATA.denoise(y, s), x0.numpy(), sched._lev)
    assert calls == seen  # the same levels in the same order
    np.testing.assert_array_equal(x.numpy(), want)


@pytest.mark.parametrize("config", [dict(), dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)])
def test_seeded_loop_gives_diffusers_images(config):
    unet = tiny_unet()
    want = heun_loop(diffusers.HeunDiscreteScheduler(**config), unet, 8, 0)
    theirs = diffusers.HeunDiscreteScheduler(**config)
    got = heun_loop(dm.HeunDiscreteScheduler.from_config(theirs.config), unet, 8, 0)
    assert float((got - want).abs().max()) <= 1e-3


def heun_loop(sched, unet, steps, seed):
    """A pipeline's loop (Heun's ``step`` takes no generator)."""
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    x = torch.randn((2, 3, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Only one of"):
        dm.HeunDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="clip_sample_range"):
        dm.HeunDiscreteScheduler(clip_sample_range=0.0)
    with pytest.raises(ValueError, match="Betas must lie"):
        dm.HeunDiscreteScheduler(beta_start=0.1, beta_end=2.0)
    s = dm.HeunDiscreteScheduler()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        s.set_timesteps(5, num_train_timesteps=500)
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(x, torch.tensor(3.5), x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)


def test_add_noise_matches_diffusers():
    ours, theirs = dm.HeunDiscreteScheduler(), diffusers.HeunDiscreteScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[[0, 3]]
    assert rel(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < TOL_STEP


@pytest.mark.parametrize(
    "config,steps", [(dict(), 10), (dict(use_karras_sigmas=True), 10), (dict(timestep_spacing="trailing"), 7)]
)
def test_oracle_kl_of_the_full_loop(config, steps, monkeypatch):
    ours, theirs = dm.HeunDiscreteScheduler(**config), diffusers.HeunDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    # each scheduler's perfect model at the levels that scheduler calls it at (the doubled ladder)
    kl = oracle_output(ours, ours._sig, torch.float64, monkeypatch).kl(DATA)
    sig_d = theirs.sigmas.double().numpy()
    kl_d = oracle_output(theirs, sig_d, torch.float32, monkeypatch).kl(DATA)
    core = DATA.exact_solver_output("heun", ours._lev, start=float(ours.init_noise_sigma))
    assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    if config.get("use_karras_sigmas"):
        # diffusers' float32 sigma_min (7.5e-5 relative above the float64 one) enters every
        # Karras level; the core solver on diffusers' float32 ladder has diffusers' KL
        lev_d = np.concatenate([sig_d[:1], sig_d[1:-1:2], sig_d[-1:]])
        core_d = DATA.exact_solver_output("heun", lev_d, start=float(theirs.init_noise_sigma))
        assert kl_d == pytest.approx(core_d.kl(DATA), rel=1e-4)
        assert kl <= kl_d * (1 + 5e-4), (kl, kl_d)
    else:
        assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)
