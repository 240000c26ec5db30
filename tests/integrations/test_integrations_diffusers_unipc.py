"""diffmath.integrations.diffusers: UniPCMultistepScheduler against diffusers' own class (its
float32 error), the core solver sample_unipc and its step functions, a seeded pipeline-style
loop with a small local UNet2DModel, and the exact Gaussian oracle."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.samplers import sample_unipc  # noqa: E402
from tests.integrations.test_integrations_diffusers_multistep import TOL_SIGMA_MIN, TOL_STEP, vp_oracle_output  # noqa: E402
from tests.integrations.test_integrations_diffusers_sigma import DATA, SHAPE, rel, tiny_unet  # noqa: E402


def test_config_keys_defaults_and_round_trips(tmp_path):
    ours, theirs = dm.UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler
    po = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    assert list(po) == list(pt)
    assert {k: v.default for k, v in po.items()} == {k: v.default for k, v in pt.items()}
    assert ours.order == theirs.order
    cfg = dict(
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        beta_schedule="scaled_linear",
        solver_order=3,
        solver_type="bh1",
    )
    a = ours(**cfg)
    b = theirs.from_config(a.config)
    c = ours.from_config(theirs(**cfg).config)
    assert dict(b.config) == dict(theirs(**cfg).config)
    assert type(c) is ours and dict(c.config) == dict(a.config)
    a.save_pretrained(tmp_path)
    assert type(theirs.from_pretrained(tmp_path)) is theirs
    assert type(ours.from_pretrained(tmp_path)) is ours
    assert "UniPCMultistepScheduler" in ours._compatibles
    assert ours().init_noise_sigma == theirs().init_noise_sigma == 1.0
    assert ours(solver_type="midpoint").config.solver_type == theirs(solver_type="midpoint").config.solver_type == "bh2"


UNIPC_CASES = [
    (dict(), 8),
    (dict(), 20),
    (dict(solver_order=1), 10),
    (dict(solver_order=3), 20),
    (dict(solver_type="bh1", solver_order=3), 12),
    (dict(predict_x0=False), 10),
    (dict(predict_x0=False, final_sigmas_type="sigma_min"), 10, TOL_SIGMA_MIN),
    (
        dict(predict_x0=False, solver_type="bh1", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        10,
        TOL_SIGMA_MIN,
    ),
    (dict(disable_corrector=[0, 2, 3]), 10),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3), 12, TOL_SIGMA_MIN),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    (dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1), 10),
    (dict(thresholding=True, prediction_type="sample", sample_max_value=0.5), 10),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 10),
    (dict(use_karras_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_exponential_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_beta_sigmas=True), 12, TOL_SIGMA_MIN),
    (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 12, TOL_SIGMA_MIN),
]


@pytest.mark.parametrize("case", UNIPC_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_each_unipc_step_matches_diffusers(case):
    config, steps, tol = (*case, TOL_STEP)[:3]
    ours, theirs = dm.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    if config.get("use_exponential_sigmas") or config.get("use_beta_sigmas") or config.get("use_karras_sigmas"):
        # t(sigma) from diffusers' float32 log-sigma table, rounded / truncated to an integer
        assert int((ours.timesteps - theirs.timesteps).abs().max()) <= 1
    else:
        assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=5e-4, atol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    for k, t in enumerate(ours.timesteps):
        # a smooth model output along the ladder (see the DPM-Solver++ test)
        m = 0.8 * x + 0.1 * torch.randn(SHAPE, generator=g) if k == 0 else x * 0.7 + 0.05 * float(t) / 1000
        assert torch.equal(ours.scale_model_input(x, t), x)
        a = ours.step(m, t, x)
        b = theirs.step(m, t, x)
        assert type(a) is type(b)
        assert a.prev_sample.dtype == b.prev_sample.dtype
        if torch.isnan(b.prev_sample).any():
            # diffusers' step to sigma = 0 with B(h) = h (bh1) or in noise prediction forms
            # 0 * inf: NaN. The adapter returns D there (the h -> inf limit).
            assert float(ours.sigmas[k + 1]) == 0 and (config.get("solver_type") == "bh1" or not ours.predict_x0)
            assert torch.isfinite(a.prev_sample).all()
        else:
            assert rel(a.prev_sample, b.prev_sample) < tol, k
        x = b.prev_sample  # both continue from the same state
    assert ours.lower_order_nums == theirs.lower_order_nums
    assert ours.this_order == theirs.this_order


@pytest.mark.parametrize("order,variant", [(1, "bh2"), (2, "bh2"), (2, "bh1"), (3, "bh2"), (3, "bh1")])
def test_loop_is_the_core_solver(order, variant):
    """The adapter's loop (lower_order_final=False) driven by the exact denoiser is sample_unipc
    on the adapter's float64 ladder, up to the VP scaling of the state (two roundings per step)."""
    sched = dm.UniPCMultistepScheduler(
        prediction_type="sample", solver_order=order, solver_type=variant, lower_order_final=False
    )
    sched.set_timesteps(15)
    sig = sched._sig
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        xv = x * math.sqrt(1 + sig[i] ** 2)
        x = sched.step(torch.as_tensor(DATA.denoise(xv.numpy(), float(sig[i]))), t, x).prev_sample
    want = sample_unipc(DATA.denoise, (x0 * math.sqrt(1 + sig[0] ** 2)).numpy(), sig, order=order, variant=variant)
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-13, atol=1e-15)


def test_noise_prediction_matches_data_prediction_at_first_order():
    """UniPC-1 without the corrector is DDIM in both parameterizations: predict_x0=False and True
    agree (the noise form's x - (sigma - sigma') eps is the data form's D + (sigma'/sigma)(x - D))."""
    out = []
    for predict_x0 in (True, False):
        sched = dm.UniPCMultistepScheduler(solver_order=1, predict_x0=predict_x0, disable_corrector=list(range(10)))
        sched.set_timesteps(10)
        x = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        for i, t in enumerate(sched.timesteps):
            s = float(sched._sig[i])
            xv = x * math.sqrt(1 + s * s)
            eps = (xv - torch.as_tensor(DATA.denoise(xv.numpy(), s))) / s
            x = sched.step(eps, t, x).prev_sample
        out.append(x.numpy())
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", [dict(), dict(use_karras_sigmas=True, timestep_spacing="trailing")])
def test_seeded_loop_gives_diffusers_images(config):
    unet = tiny_unet()
    got = []
    for cls in (diffusers.UniPCMultistepScheduler, dm.UniPCMultistepScheduler):
        sched = cls.from_config(diffusers.UniPCMultistepScheduler(**config).config)
        g = torch.Generator().manual_seed(0)
        sched.set_timesteps(8)
        x = torch.randn((2, 3, 8, 8), generator=g) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        got.append(x)
    assert float((got[0] - got[1]).abs().max()) <= 1e-3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        dm.UniPCMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="solver_p"):
        dm.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="solver_order"):
        dm.UniPCMultistepScheduler(solver_order=0)
    with pytest.raises(NotImplementedError):
        dm.UniPCMultistepScheduler(solver_type="bh3")
    with pytest.raises(ValueError, match="Betas must lie"):
        dm.UniPCMultistepScheduler(beta_start=0.1, beta_end=2.0)
    s = dm.UniPCMultistepScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="sigmas"):
        s.set_timesteps(5, sigmas=[1.0, 0.5])
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(x, 998, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)


def test_add_noise_matches_diffusers():
    ours, theirs = dm.UniPCMultistepScheduler(), diffusers.UniPCMultistepScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[[1, 4]]
    assert rel(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < TOL_STEP


@pytest.mark.parametrize(
    "config,steps",
    [
        (dict(), 10),
        (dict(solver_order=3), 20),
        (dict(use_karras_sigmas=True), 10),
        (dict(timestep_spacing="trailing"), 7),
        (dict(solver_type="bh1"), 10),
    ],
)
def test_oracle_kl_of_the_full_loop(config, steps, monkeypatch):
    ours, theirs = dm.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    sig = ours._sig
    kl = vp_oracle_output(ours, sig, torch.float64, monkeypatch).kl(DATA)
    sig_d = theirs.sigmas.double().numpy()
    if config.get("solver_type") == "bh1":
        # diffusers' bh1 step to sigma = 0 is NaN (B(h) = h = inf times a zero sum)
        with pytest.raises(ValueError, match="finite"):
            vp_oracle_output(theirs, sig_d, torch.float32, monkeypatch)
        kl_d = math.inf
    else:
        kl_d = vp_oracle_output(theirs, sig_d, torch.float32, monkeypatch).kl(DATA)
    if config.get("solver_order", 2) <= 2:
        # with order <= 2, lower_order_final changes only the step to 0, which returns D anyway
        core = DATA.exact_solver_output(
            "unipc", sig, start=math.sqrt(1 + sig[0] ** 2), variant=config.get("solver_type", "bh2")
        )
        assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    if config.get("use_karras_sigmas"):
        # diffusers' float32 sigma_min enters every Karras level (see the DPM-Solver++ test)
        core_d = DATA.exact_solver_output("unipc", sig_d, start=math.sqrt(1 + sig_d[0] ** 2))
        assert kl_d == pytest.approx(core_d.kl(DATA), rel=1e-4)
        assert kl <= kl_d * (1 + 5e-4), (kl, kl_d)
    else:
        assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)
