"""diffmath.integrations.diffusers: LMSDiscreteScheduler against diffusers' own class (its
float32 error and quad weights), the core solver sample_lms it steps with, a seeded
pipeline-style loop with a small local UNet2DModel, and the exact Gaussian oracle."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.samplers import sample_lms  # noqa: E402
from diffmath.samplers.solvers import euler_step  # noqa: E402
from tests.integrations.test_integrations_diffusers_sigma import (  # noqa: E402
    DATA,
    SHAPE,
    TOL_SIGMA_MIN,
    TOL_STEP,
    oracle_output,
    rel,
    tiny_unet,
)

pytestmark = pytest.mark.filterwarnings("ignore:The `scale_model_input` function")


def test_config_keys_defaults_and_round_trips(tmp_path):
    ours, theirs = dm.LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler
    po = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    assert list(po) == list(pt)
    assert {k: v.default for k, v in po.items()} == {k: v.default for k, v in pt.items()}
    assert (
        inspect.signature(ours.step).parameters["order"].default
        == inspect.signature(theirs.step).parameters["order"].default
        == 4
    )
    assert ours.order == theirs.order
    cfg = dict(prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule="scaled_linear")
    a = ours(**cfg)
    b = theirs.from_config(a.config)
    c = ours.from_config(theirs(**cfg).config)
    assert dict(b.config) == dict(theirs(**cfg).config)
    assert type(c) is ours and dict(c.config) == dict(a.config)
    a.save_pretrained(tmp_path)
    assert type(theirs.from_pretrained(tmp_path)) is theirs
    assert type(ours.from_pretrained(tmp_path)) is ours
    assert "LMSDiscreteScheduler" in ours._compatibles


def test_weights_are_the_exact_integrals():
    """get_lms_coefficient against diffusers' scipy quad (epsrel 1e-4, float32 sigmas): the
    weights of each order sum to sigma_{i+1} - sigma_i (a constant derivative is integrated
    exactly), which diffusers' meet to its quad and float32 tolerance."""
    ours, theirs = dm.LMSDiscreteScheduler(), diffusers.LMSDiscreteScheduler()
    ours.set_timesteps(12)
    theirs.set_timesteps(12)
    for i in range(3, 12):
        for q in (1, 2, 3, 4):
            a = np.array([ours.get_lms_coefficient(q, i, j) for j in range(q)])
            b = np.array([theirs.get_lms_coefficient(q, i, j) for j in range(q)])
            h = ours._sig[i + 1] - ours._sig[i]
            assert a.sum() == pytest.approx(h, rel=1e-12, abs=1e-14)
            np.testing.assert_allclose(a, b, rtol=5e-4, atol=1e-6 * abs(h))


LMS_CASES = [
    (dict(), 10, 4),
    (dict(), 10, 2),
    (
        dict(
            timestep_spacing="leading",
            steps_offset=1,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
        ),
        25,
        4,
    ),
    (dict(timestep_spacing="trailing", prediction_type="v_prediction"), 7, 3),
    # x0-prediction: x - D is of the order of x at sigma_min, where diffusers' float32 sigma_min
    # and its quad weights (epsrel 1e-4) both show
    (dict(prediction_type="sample"), 10, 4, TOL_SIGMA_MIN),
    (dict(use_karras_sigmas=True), 12, 4, TOL_SIGMA_MIN),
    (dict(use_exponential_sigmas=True), 12, 4, TOL_SIGMA_MIN),
    (dict(use_beta_sigmas=True), 12, 4, TOL_SIGMA_MIN),
]


@pytest.mark.parametrize("case", LMS_CASES, ids=lambda c: f"{c[0]}-{c[1]}-order{c[2]}")
def test_each_step_matches_diffusers(case):
    config, steps, order, tol = (*case, TOL_STEP)[:4]
    ours, theirs = dm.LMSDiscreteScheduler(**config), diffusers.LMSDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    assert torch.allclose(ours.timesteps, theirs.timesteps, rtol=1e-4, atol=1e-3)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=5e-4, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * float(theirs.init_noise_sigma)
    data = torch.randn(SHAPE, generator=g)
    for t in ours.timesteps:
        # a smooth model output along the ladder: a fresh random one per step makes the
        # multistep differences O(1) and magnifies diffusers' quad tolerance (epsrel 1e-4)
        if config.get("prediction_type") == "sample":
            m = data + 0.01 * x / float(theirs.init_noise_sigma)
        else:
            m = 0.9 * x / float(theirs.init_noise_sigma) + 0.05 * float(t) / 1000
        assert rel(ours.scale_model_input(x, t), theirs.scale_model_input(x, t)) < tol
        a = ours.step(m, t, x, order=order)
        b = theirs.step(m, t, x, order=order)
        assert a.prev_sample.dtype == b.prev_sample.dtype
        assert rel(a.prev_sample, b.prev_sample) < tol
        assert rel(a.pred_original_sample, b.pred_original_sample) < tol
        x = b.prev_sample  # both continue from the same state


@pytest.mark.parametrize("order", [1, 2, 4])
def test_loop_is_the_core_solver(order):
    """The adapter's loop, driven by a denoiser, is sample_lms on the adapter's float64 ladder,
    bit for bit in float64."""
    sched = dm.LMSDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(9)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * float(
        sched.init_noise_sigma
    )
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(x, t) * 0 + x  # the pipeline's call (its result is the model's input)
        x = sched.step(torch.as_tensor(DATA.denoise(x.numpy(), float(sched._sig[i]))), t, x, order=order).prev_sample
    want = sample_lms(DATA.denoise, x0.numpy(), sched._sig, order=order)
    np.testing.assert_array_equal(x.numpy(), want)


def test_a_start_mid_ladder_warms_up_from_euler():
    """Started at index 5 (image-to-image), the first step has one derivative: the Euler step.
    diffusers takes the first of its order-4 weights there, which is not sigma_{i+1} - sigma_i."""
    sched = dm.LMSDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(10)
    sched.set_begin_index(5)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    den = torch.as_tensor(DATA.denoise(x.numpy(), float(sched._sig[5])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = sched.step(den, sched.timesteps[5], x).prev_sample
    np.testing.assert_allclose(
        got.numpy(), euler_step(x.numpy(), den.numpy(), sched._sig[5], sched._sig[6]), rtol=1e-14, atol=1e-15
    )


def test_seeded_loop_gives_diffusers_images():
    unet = tiny_unet()
    got = []
    for sched in (diffusers.LMSDiscreteScheduler(), dm.LMSDiscreteScheduler()):
        g = torch.Generator().manual_seed(0)
        sched.set_timesteps(8)
        x = torch.randn((2, 3, 8, 8), generator=g) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        got.append(x)
    assert float((got[0] - got[1]).abs().max()) <= 1e-3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Only one of"):
        dm.LMSDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="Betas must lie"):
        dm.LMSDiscreteScheduler(beta_start=0.1, beta_end=2.0)
    s = dm.LMSDiscreteScheduler()
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="order"):
        s.step(x, s.timesteps[0], x, order=0)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(x, torch.tensor(3.5), x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)
    with pytest.warns(UserWarning, match="scale_model_input"):
        dm.LMSDiscreteScheduler().set_timesteps(5) or None
        s2 = dm.LMSDiscreteScheduler()
        s2.set_timesteps(5)
        s2.step(x, s2.timesteps[0], x)


def test_add_noise_matches_diffusers():
    ours, theirs = dm.LMSDiscreteScheduler(), diffusers.LMSDiscreteScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[[1, 4]]
    assert rel(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < TOL_STEP


@pytest.mark.parametrize(
    "config,steps", [(dict(), 10), (dict(use_karras_sigmas=True), 10), (dict(timestep_spacing="trailing"), 7)]
)
def test_oracle_kl_of_the_full_loop(config, steps, monkeypatch):
    ours, theirs = dm.LMSDiscreteScheduler(**config), diffusers.LMSDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    kl = oracle_output(ours, ours._sig, torch.float64, monkeypatch).kl(DATA)
    sig_d = theirs.sigmas.double().numpy()
    kl_d = oracle_output(theirs, sig_d, torch.float32, monkeypatch).kl(DATA)
    core = DATA.exact_solver_output("lms", ours._sig, start=float(ours.init_noise_sigma))
    assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    if config.get("use_karras_sigmas"):
        # diffusers' float32 sigma_min enters every Karras level (see the Heun test)
        core_d = DATA.exact_solver_output("lms", sig_d, start=float(theirs.init_noise_sigma))
        assert kl_d == pytest.approx(core_d.kl(DATA), rel=1e-3)
        assert kl <= kl_d * (1 + 5e-4), (kl, kl_d)
    else:
        assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)
