"""diffmath.integrations.diffusers: the sigma-space adapters (Euler, Euler ancestral) against
diffusers' own classes (their float32 error), the core solvers they step with, a seeded
pipeline-style loop with a small local UNet2DModel, and the exact Gaussian oracle."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_euler_discrete  # noqa: E402
from diffusers.utils import torch_utils  # noqa: E402

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.oracle import GaussianData  # noqa: E402
from diffmath.samplers import sample_euler, sample_euler_ancestral  # noqa: E402

KINDS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
SHAPE = (2, 3, 4, 4)
# one step against diffusers: diffusers computes in float32 from float32 tables; its error on a
# step is ~1e-6 relative (observed <= 2e-6 over these configs), the adapter's is a half-ulp
TOL_STEP = 1e-5
# ladders built between the table's ends take diffusers' float32 sigma_min (7.5e-5 relative off,
# from 1 - abar_0 in float32) into every level; observed <= 1.6e-5 on these steps
TOL_SIGMA_MIN = 1e-4
# diffusers' float32 cosine betas put 2.6e-4 relative error on sigma at t = 0 (observed 1.6e-4 on
# the last step)
TOL_COSINE = 5e-4


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kind", KINDS)
def test_config_keys_defaults_and_round_trips(kind, tmp_path):
    ours, theirs = getattr(dm, kind), getattr(diffusers, kind)
    po = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    assert list(po) == list(pt)
    assert {k: v.default for k, v in po.items()} == {k: v.default for k, v in pt.items()}
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
    assert kind in ours._compatibles


# ----------------------------------------------------------------------------- steps vs diffusers
STEP_CASES = [
    ("EulerDiscreteScheduler", dict(), 10),
    (
        "EulerDiscreteScheduler",
        dict(
            timestep_spacing="leading",
            steps_offset=1,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
        ),
        25,
    ),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 7),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), 12, TOL_SIGMA_MIN),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), 12, TOL_SIGMA_MIN),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True), 12, TOL_SIGMA_MIN),
    ("EulerDiscreteScheduler", dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2"), 10, TOL_COSINE),
    (
        "EulerDiscreteScheduler",
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        10,
    ),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"), 10),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), 10, TOL_SIGMA_MIN),
    ("EulerAncestralDiscreteScheduler", dict(), 10),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1), 25),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 7),
    ("EulerAncestralDiscreteScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_each_step_matches_diffusers(case):
    kind, config, steps, tol = (*case, TOL_STEP)[:4]
    ours, theirs = getattr(dm, kind)(**config), getattr(diffusers, kind)(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    assert torch.allclose(ours.timesteps, theirs.timesteps, rtol=1e-4, atol=1e-3)
    # diffusers' sigma near t = 0 carries its float32 1 - abar (1.5e-4 relative at t = 0 for
    # linear betas, 2.6e-4 for its float32 cosine betas)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=5e-4, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    kw = dict(s_churn=0.5) if kind == "EulerDiscreteScheduler" else {}
    for t in ours.timesteps:
        x = torch.randn(SHAPE, generator=g) * 3.0
        m = torch.randn(SHAPE, generator=g)
        assert rel(ours.scale_model_input(x, t), theirs.scale_model_input(x, t)) < tol
        a = ours.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **kw)
        b = theirs.step(m, t, x, generator=torch.Generator().manual_seed(int(t)), **kw)
        assert a.prev_sample.dtype == b.prev_sample.dtype
        assert rel(a.prev_sample, b.prev_sample) < tol
        assert rel(a.pred_original_sample, b.pred_original_sample) < tol


@pytest.mark.parametrize("kind", KINDS)
def test_steps_are_the_core_solvers(kind):
    """The adapter's loop, driven by a denoiser, is diffmath's solver on the adapter's float64
    ladder, bit for bit in float64."""
    sched = getattr(dm, kind)(prediction_type="sample")
    sched.set_timesteps(8)
    data = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.09]])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64) * float(sched.init_noise_sigma)
    zs = [torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(8)]
    x, calls = x0.clone(), []

    def stub(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(1)
        return zs[len(calls) - 1].clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_utils, "randn_tensor", stub)
        for i, t in enumerate(sched.timesteps):
            den = torch.as_tensor(data.denoise(x.numpy(), float(sched._sig[i])))
            x = sched.step(den, t, x).prev_sample
    if kind == "EulerDiscreteScheduler":
        want = sample_euler(data.denoise, x0.numpy(), sched._sig)
    else:
        it = iter(zs)
        want = sample_euler_ancestral(
            data.denoise, x0.numpy(), sched._sig, noise_sampler=lambda s, sn: next(it).numpy()
        )
    np.testing.assert_array_equal(x.numpy(), want)


def test_add_noise_matches_diffusers():
    for kind in KINDS:
        ours, theirs = getattr(dm, kind)(), getattr(diffusers, kind)()
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
        t = ours.timesteps[[1, 4]]
        assert rel(ours.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < TOL_STEP


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        dm.EulerDiscreteScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="Only one of"):
        dm.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        dm.EulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="Betas must lie"):
        dm.EulerAncestralDiscreteScheduler(beta_start=0.1, beta_end=2.0)
    s = dm.EulerDiscreteScheduler()
    s.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(x, 0, x)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.step(x, torch.tensor(3.5), x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[0], x)
    with pytest.raises(ValueError, match="sigmas"):
        s.set_timesteps(sigmas=[2.0, 1.0, -1.0])


# ----------------------------------------------------------------------------- pipeline-style loop
def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return unet.eval()


def run_loop(sched, unet, steps, seed):
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    x = torch_utils.randn_tensor((2, 3, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x, generator=g).prev_sample
    return x, g.get_state()


@pytest.mark.parametrize(
    "kind,config",
    [
        ("EulerDiscreteScheduler", dict()),
        ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
        ("EulerAncestralDiscreteScheduler", dict()),
    ],
)
def test_seeded_loop_gives_diffusers_images(kind, config):
    unet = tiny_unet()
    want, state = run_loop(getattr(diffusers, kind)(**config), unet, 8, 0)
    theirs = getattr(diffusers, kind)(**config)
    got, state2 = run_loop(getattr(dm, kind).from_config(theirs.config), unet, 8, 0)
    assert torch.equal(state, state2)  # the same draws
    assert float((got - want).abs().max()) <= 1e-3


# ----------------------------------------------------------------------------- exact oracle
DATA = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.09]])


def oracle_output(sched, sig, dtype, monkeypatch, *, modules=None, vp=False):
    """The exact output distribution of the scheduler's loop from x_T ~ N(0, init_noise_sigma^2 I)
    driven by the data's exact eps at the float64 ladder ``sig`` (the same perfect model for both
    schedulers), identified on basis inputs (the loop is affine in x_T and its draws).

    ``modules``: the diffusers scheduler modules whose ``randn_tensor`` is replaced by the basis
    draws (default: Euler's two); ``vp=True``: the scheduler's sample is the VP x (the sigma-space
    x is x sqrt(1 + sigma^2)), as in DPM-Solver++ and UniPC."""
    if modules is None:
        modules = (scheduling_euler_discrete, scheduling_euler_ancestral_discrete)
    D, K = DATA.dim, len(sched.timesteps)
    x = torch.zeros(1 + D + K * D, D, dtype=dtype)
    x[1 : 1 + D] = torch.eye(D, dtype=dtype)
    calls = []

    def stub(shape, generator=None, device=None, dtype=None, layout=None):
        k = len(calls)
        calls.append(k)
        z = torch.zeros(shape, dtype=dtype)
        z[1 + D + k * D : 1 + D + (k + 1) * D] = torch.eye(D, dtype=dtype)
        return z

    for mod in (torch_utils, *modules):
        monkeypatch.setattr(mod, "randn_tensor", stub)
    for i, t in enumerate(sched.timesteps):
        s = float(sig[i])
        xd = x.double() * math.sqrt(1 + s * s) if vp else x.double()
        eps = (xd - torch.as_tensor(DATA.denoise(xd.numpy(), s))) / s
        x = sched.step(eps.to(dtype), t, x).prev_sample
    monkeypatch.undo()
    out = x.double().numpy()
    b = out[0]
    A = (out[1 : 1 + D] - b).T * float(sched.init_noise_sigma)
    cov = A @ A.T
    for k in range(len(calls)):
        N = (out[1 + D + k * D : 1 + D + (k + 1) * D] - b).T
        cov += N @ N.T
    return GaussianData(b, 0.5 * (cov + cov.T))


@pytest.mark.parametrize(
    "kind,config,steps",
    [
        ("EulerDiscreteScheduler", dict(), 10),
        ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), 10),
        ("EulerDiscreteScheduler", dict(timestep_spacing="trailing"), 7),
        ("EulerAncestralDiscreteScheduler", dict(), 10),
        ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing"), 7),
    ],
)
def test_oracle_kl_of_the_full_loop(kind, config, steps, monkeypatch):
    ours, theirs = getattr(dm, kind)(**config), getattr(diffusers, kind)(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    sig = ours._sig
    out = oracle_output(ours, sig, torch.float64, monkeypatch)
    kl = out.kl(DATA)
    kl_d = oracle_output(theirs, sig, torch.float32, monkeypatch).kl(DATA)
    # the adapter's loop is diffmath's solver, whose exact output the oracle identifies
    solver = "euler" if kind == "EulerDiscreteScheduler" else "euler_ancestral"
    core = DATA.exact_solver_output(solver, sig)
    assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    # never worse than diffusers beyond float32 noise in diffusers' own tables
    assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)
