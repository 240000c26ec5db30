"""diffmath.integrations.diffusers: DPMSolverMultistepScheduler against diffusers' own class
(its float32 error), the core per-step functions it calls, a seeded pipeline-style loop with a
small local UNet2DModel, and the exact Gaussian oracle."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_dpmsolver_multistep  # noqa: E402
from diffusers.utils import torch_utils  # noqa: E402

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.samplers import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde  # noqa: E402
from tests.integrations.test_integrations_diffusers_sigma import DATA, SHAPE, oracle_output, rel, run_loop, tiny_unet  # noqa: E402

# one step against diffusers: diffusers computes in float32 from float32 tables (observed
# <= 1.2e-6 relative over the default-ladder cases below)
TOL_STEP = 1e-5
# ladders built between the table's ends (Karras, exponential, Lu, beta) and the final
# sigma_min take diffusers' float32 sigma_0 (1.5e-4 relative off, from 1 - abar_0 in float32)
# into the step; observed <= 2.4e-5
TOL_SIGMA_MIN = 1e-4


@pytest.mark.parametrize("kind", ["DPMSolverMultistepScheduler"])
def test_config_keys_defaults_and_round_trips(kind, tmp_path):
    ours, theirs = getattr(dm, kind), getattr(diffusers, kind)
    po = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    assert list(po) == list(pt)
    assert {k: v.default for k, v in po.items()} == {k: v.default for k, v in pt.items()}
    assert ours.order == theirs.order
    cfg = dict(
        prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule="scaled_linear", solver_order=3
    )
    a = ours(**cfg)
    b = theirs.from_config(a.config)
    c = ours.from_config(theirs(**cfg).config)
    assert dict(b.config) == dict(theirs(**cfg).config)
    assert type(c) is ours and dict(c.config) == dict(a.config)
    a.save_pretrained(tmp_path)
    assert type(theirs.from_pretrained(tmp_path)) is theirs
    assert type(ours.from_pretrained(tmp_path)) is ours
    assert kind in ours._compatibles
    assert ours().init_noise_sigma == theirs().init_noise_sigma == 1.0


DPM_CASES = [
    (dict(), 8),
    (dict(), 20),
    (dict(solver_order=1), 10),
    (dict(solver_type="heun"), 12),
    (dict(algorithm_type="sde-dpmsolver++"), 10),
    (dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), 16),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    (dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1), 10),
    (dict(lambda_min_clipped=-5.1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20),
    (dict(thresholding=True, prediction_type="sample", sample_max_value=0.5), 10),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    (dict(use_karras_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_exponential_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_lu_lambdas=True), 12, TOL_SIGMA_MIN),
    (dict(use_beta_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(final_sigmas_type="sigma_min", lower_order_final=False), 20, TOL_SIGMA_MIN),
    (dict(euler_at_final=True, final_sigmas_type="sigma_min"), 10, TOL_SIGMA_MIN),
]


@pytest.mark.parametrize("case", DPM_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_each_dpm_step_matches_diffusers(case):
    config, steps, tol = (*case, TOL_STEP)[:3]
    ours, theirs = dm.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    if tol == TOL_SIGMA_MIN:
        # t(sigma) from diffusers' float32 log-sigma table, truncated to an integer: a t within
        # 1e-4 of an integer may land one off (observed: 690 against 691 for exponential sigmas)
        assert int((ours.timesteps - theirs.timesteps).abs().max()) <= 1
    else:
        assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=5e-4, atol=0)
    g = torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        # a smooth model output along the ladder (a random one per step makes the multistep
        # differences O(1), which magnifies float32 rounding of diffusers' lambda)
        x = torch.randn(SHAPE, generator=g)
        m = (
            0.8 * x + 0.1 * torch.randn(SHAPE, generator=g)
            if len(ours.model_outputs) == 0
            else x * 0.7 + 0.05 * float(t) / 1000
        )
        assert torch.equal(ours.scale_model_input(x, t), x)
        a = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        b = theirs.step(m, t, x, generator=torch.Generator().manual_seed(int(t)))
        assert type(a) is type(b)
        assert a.prev_sample.dtype == b.prev_sample.dtype
        assert rel(a.prev_sample, b.prev_sample) < tol
    assert ours.lower_order_nums == theirs.lower_order_nums


def test_third_order_is_the_cores_exact_term():
    """Order 3 integrates the quadratic exactly (sample_dpmpp_3m_sde with eta = 0); diffusers'
    third-order coefficient differs, so its step is checked against the core, and the
    difference to diffusers is the D2 term alone."""
    ours = dm.DPMSolverMultistepScheduler(solver_order=3, solver_type="heun", prediction_type="sample")
    ours.set_timesteps(20)
    sig = ours._sig
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x0.clone()
    for i, t in enumerate(ours.timesteps):
        xv = x * math.sqrt(1 + sig[i] ** 2)
        x = ours.step(torch.as_tensor(DATA.denoise(xv.numpy(), float(sig[i]))), t, x).prev_sample
    want = sample_dpmpp_3m_sde(DATA.denoise, (x0 * math.sqrt(1 + sig[0] ** 2)).numpy(), sig, eta=0.0)
    # the adapter's state is the VP x_t: the two scalings per step round (observed 2e-16)
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "config,solver",
    [
        (dict(), "dpmpp_2m"),
        (dict(solver_type="heun"), "dpmpp_2m_sde"),
        (dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
        (dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), "dpmpp_3m_sde"),
    ],
)
def test_loop_is_the_core_solver(config, solver):
    """The adapter's loop (20 steps: no lower-order steps at the end) driven by the exact
    denoiser equals the core solver on the adapter's float64 ladder, up to the VP scaling of
    the state (two roundings per step)."""
    sched = dm.DPMSolverMultistepScheduler(prediction_type="sample", **config)
    sched.set_timesteps(20)
    sig = sched._sig
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    zs = [torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(20)]
    calls = []

    def stub(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(1)
        return zs[len(calls) - 1].clone()

    x = x0.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_utils, "randn_tensor", stub)
        for i, t in enumerate(sched.timesteps):
            xv = x * math.sqrt(1 + sig[i] ** 2)
            x = sched.step(torch.as_tensor(DATA.denoise(xv.numpy(), float(sig[i]))), t, x).prev_sample
    start = (x0 * math.sqrt(1 + sig[0] ** 2)).numpy()
    it = iter(zs)
    ns = dict(noise_sampler=lambda s, sn: next(it).numpy())
    if solver == "dpmpp_2m":
        want = sample_dpmpp_2m(DATA.denoise, start, sig)
    elif solver == "dpmpp_2m_sde":
        eta = 1.0 if config.get("algorithm_type") else 0.0
        want = sample_dpmpp_2m_sde(
            DATA.denoise, start, sig, eta=eta, solver_type=config.get("solver_type", "midpoint"), **ns
        )
    else:
        want = sample_dpmpp_3m_sde(DATA.denoise, start, sig, eta=1.0, **ns)
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "config", [dict(), dict(use_karras_sigmas=True, solver_type="heun"), dict(algorithm_type="sde-dpmsolver++")]
)
def test_seeded_loop_gives_diffusers_images(config):
    unet = tiny_unet()
    want, state = run_loop(diffusers.DPMSolverMultistepScheduler(**config), unet, 8, 0)
    theirs = diffusers.DPMSolverMultistepScheduler(**config)
    got, state2 = run_loop(dm.DPMSolverMultistepScheduler.from_config(theirs.config), unet, 8, 0)
    assert torch.equal(state, state2)  # the same draws
    assert float((got - want).abs().max()) <= 1e-3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dpmsolver"):
        dm.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        dm.DPMSolverMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="solver_order"):
        dm.DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="Betas must lie"):
        dm.DPMSolverMultistepScheduler(beta_start=0.1, beta_end=2.0)
    s = dm.DPMSolverMultistepScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(x, 998, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)


def test_add_noise_matches_diffusers():
    ours, theirs = dm.DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[[1, 4]]
    assert rel(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < TOL_STEP


# ----------------------------------------------------------------------------- exact oracle
def vp_oracle_output(sched, sig, dtype, monkeypatch):
    """The exact output distribution of a VP-sample scheduler's loop from x_T ~ N(0, I) driven by
    the data's exact eps at the float64 ladder ``sig`` (``oracle_output`` with vp=True)."""
    return oracle_output(sched, sig, dtype, monkeypatch, modules=(scheduling_dpmsolver_multistep,), vp=True)


@pytest.mark.parametrize(
    "config,steps,solver,options",
    [
        (dict(), 10, "dpmpp_2m", {}),
        (dict(use_karras_sigmas=True), 10, "dpmpp_2m", {}),
        (dict(timestep_spacing="trailing"), 7, "dpmpp_2m", {}),
        (dict(solver_type="heun"), 20, "dpmpp_2m_sde", dict(eta=0.0, solver_type="heun")),
        (dict(algorithm_type="sde-dpmsolver++"), 10, "dpmpp_2m_sde", {}),
    ],
)
def test_oracle_kl_of_the_full_loop(config, steps, solver, options, monkeypatch):
    ours, theirs = dm.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    sig = ours._sig
    kl = vp_oracle_output(ours, sig, torch.float64, monkeypatch).kl(DATA)
    # each scheduler's perfect model at the levels that scheduler steps between
    sig_d = theirs.sigmas.double().numpy()
    kl_d = vp_oracle_output(theirs, sig_d, torch.float32, monkeypatch).kl(DATA)
    if steps >= 15 or solver == "dpmpp_2m" or options.get("eta") == 0.0 or config.get("algorithm_type"):
        core = DATA.exact_solver_output(solver, sig, start=math.sqrt(1 + sig[0] ** 2), **options)
        # lower_order_final (< 15 steps) makes the adapter's second-to-last step first order only
        # for order 3; orders <= 2 are the core loop step for step
        assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    if config.get("use_karras_sigmas"):
        # diffusers' float32 sigma_min (8.3e-5 relative above the float64 one) enters every
        # Karras level; that ladder, not the arithmetic, gives diffusers' 1.8e-4 lower KL here:
        # the core solver on diffusers' float32 ladder has diffusers' KL
        core_d = DATA.exact_solver_output(solver, sig_d, start=math.sqrt(1 + sig_d[0] ** 2), **options)
        assert kl_d == pytest.approx(core_d.kl(DATA), rel=1e-4)
        assert kl <= kl_d * (1 + 5e-4), (kl, kl_d)
    else:
        assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)
