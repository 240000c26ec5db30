"""Sampler steps (DDPM, DDIM, reverse-time Euler-Maruyama, Langevin) with explicit noise against
float64 numpy references written from the equations (tests/reference/_kernel_ref.py) and against
the core float64 versions in diffmath.samplers; in-kernel noise against the numpy Philox
reference (Triton path) and, as the documented identity of both paths, the randn stream."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffmath as dm
import diffmath.kernels as K
from tests.kernels._kernel_strategies import DTYPES, KSET, TOL, make, schedules, shapes, timestep, tnp
from tests.reference._kernel_ref import ddim_step as ddim_ref
from tests.reference._kernel_ref import ddpm_step as ddpm_ref
from tests.reference._kernel_ref import euler_maruyama_step as em_ref
from tests.reference._kernel_ref import langevin_step as langevin_ref
from tests.reference._kernel_ref import magnitude, rel_err, stream_normal, subvp_coefs, ve_coefs, vp_coefs

samplers = pytest.importorskip("diffmath.samplers")
sde_mod = pytest.importorskip("diffmath.sde")

SDES = {
    "vp": (lambda: sde_mod.VPSDE(), vp_coefs),
    "subvp": (lambda: sde_mod.SubVPSDE(), subvp_coefs),
    "ve": (lambda: sde_mod.VESDE(), ve_coefs),
}


def _dev(t, dev):
    return t.to(dev) if isinstance(t, torch.Tensor) else t


def _check(out, ref, core, x, mag):
    """out against the float64 reference and the core, norm-wise relative to the larger of the
    result and the sum of its terms in absolute value (``_kernel_ref.rel_err``)."""
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    o = out.cpu().double().numpy()
    # A result outside the dtype's range (float16: 65504; DDIM from a tiny abar_t can get
    # there) rounds to +-inf as IEEE casting does, on both paths and in the core; the rest is
    # compared as usual.
    fmax = float(torch.finfo(x.dtype).max)
    over = np.abs(ref) > fmax * 1.001
    assert np.array_equal(o[over], np.sign(ref[over]) * np.inf)
    keep = np.abs(ref) < fmax * 0.999
    if not keep.all():
        o, ref, mag = o[keep], ref[keep], mag[keep]
        core = core[keep] if core is not None else None
    assert rel_err(o, ref, mag) <= TOL[x.dtype], rel_err(o, ref, mag)
    if core is not None:
        assert rel_err(o, core, mag) <= TOL[x.dtype], rel_err(o, core, mag)


# ----------------------------------------------------------------------------- DDPM
@settings(KSET)
@given(
    s=schedules(),
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
    seed=st.integers(0, 2**32),
    variance=st.sampled_from(["small", "large"]),
    clip=st.sampled_from([None, 1.0, 0.5]),
)
def test_ddpm_matches_reference(path, s, shape, dtype, data, seed, variance, clip):
    _, dev = path
    t = data.draw(timestep(s.num_timesteps, shape[0]))
    (x, eps, z), (xn, en, zn) = make(shape, dtype, dev, seed, 3)
    out = K.ddpm_step(s, x, _dev(t, dev), eps, noise=z, variance=variance, clip_x0=clip)
    ref = ddpm_ref(s.betas, xn, tnp(t), en, zn, variance, clip)
    core = samplers.ddpm_step(
        s, torch.from_numpy(xn), t, torch.from_numpy(en), torch.from_numpy(zn), variance=variance, clip_x0=clip
    )
    # the terms' size before the clip: clipping is 1-Lipschitz, so it passes on x0's rounding
    # error (~eps32 (|x| + |eps|) / sqrt(abar)) whatever it clips to
    mag = magnitude(lambda x_, e_, z_: ddpm_ref(s.betas, x_, tnp(t), e_, z_, variance, None), xn, en, zn)
    _check(out, ref, core.numpy(), x, mag)


def test_ddpm_needs_no_noise_at_t0(path):
    _, dev = path
    s = dm.linear_schedule(100)
    (x, eps), (xn, en) = make((3, 4), torch.float32, dev, 0, 2)
    out = K.ddpm_step(s, x, 0, eps)
    assert rel_err(out.cpu().double().numpy(), ddpm_ref(s.betas, xn, 0, en, 0 * en)) <= 1e-6
    out = K.ddpm_step(s, x, torch.zeros(3, dtype=torch.long, device=dev), eps, seed=3)  # seed unused
    assert rel_err(out.cpu().double().numpy(), ddpm_ref(s.betas, xn, 0, en, 0 * en)) <= 1e-6
    with pytest.raises(ValueError, match="seed=<int"):
        K.ddpm_step(s, x, torch.tensor([0, 1, 0], device=dev), eps)


# ----------------------------------------------------------------------------- DDIM
@st.composite
def ddim_pair(draw, T, B):
    """(t, t_prev) with -1 <= t_prev < t, as ints or (B,) tensors."""
    if draw(st.booleans()):
        t = draw(st.integers(0, T - 1))
        tp = draw(st.sampled_from([-1, t - 1]) | st.integers(-1, t - 1))
        return t, tp
    ts = draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B))
    tps = [draw(st.integers(-1, v - 1)) for v in ts]
    return torch.tensor(ts), torch.tensor(tps)


@settings(KSET)
@given(
    s=schedules(),
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
    seed=st.integers(0, 2**32),
    eta=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_ddim_matches_reference(path, s, shape, dtype, data, seed, eta):
    _, dev = path
    t, tp = data.draw(ddim_pair(s.num_timesteps, shape[0]))
    (x, eps, z), (xn, en, zn) = make(shape, dtype, dev, seed, 3)
    out = K.ddim_step(s, x, _dev(t, dev), _dev(tp, dev), eps, noise=z, eta=eta)
    ref = ddim_ref(s.betas, xn, tnp(t), tnp(tp), en, zn, eta)
    core = samplers.ddim_step(s, torch.from_numpy(xn), t, tp, torch.from_numpy(en), torch.from_numpy(zn), eta=eta)
    _check(
        out,
        ref,
        core.numpy(),
        x,
        magnitude(lambda x_, e_, z_: ddim_ref(s.betas, x_, tnp(t), tnp(tp), e_, z_, eta), xn, en, zn),
    )


def test_ddim_eta0_needs_no_noise(path):
    _, dev = path
    s = dm.cosine_schedule(1000)
    (x, eps), (xn, en) = make((2, 3, 5), torch.float32, dev, 1, 2)
    out = K.ddim_step(s, x, 980, 960, eps)
    assert rel_err(out.cpu().double().numpy(), ddim_ref(s.betas, xn, 980, 960, en, 0 * en)) <= 1e-6
    out = K.ddim_step(s, x, 20, -1, eps, eta=1.0)  # the last step is noiseless whatever eta
    assert rel_err(out.cpu().double().numpy(), ddim_ref(s.betas, xn, 20, -1, en, 0 * en, 1.0)) <= 1e-6


# ----------------------------------------------------------------------------- SDE, Langevin
@settings(KSET)
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32),
    kind=st.sampled_from(sorted(SDES)),
    t=st.floats(0.05, 1.0),
    dt=st.floats(-0.05, -1e-4),
    per_sample=st.booleans(),
)
def test_euler_maruyama_matches_reference(path, shape, dtype, seed, kind, t, dt, per_sample):
    _, dev = path
    make_sde, coefs = SDES[kind]
    sde = make_sde()
    (x, score, z), (xn, sn, zn) = make(shape, dtype, dev, seed, 3)
    tt = torch.linspace(t, 1.0, shape[0], dtype=torch.float64) if per_sample else t
    out = K.euler_maruyama_step(sde, x, tt.to(dev) if per_sample else tt, dt, score, noise=z)
    ref = em_ref(coefs, xn, tnp(tt), dt, sn, zn)
    sc = torch.from_numpy(sn)
    core = samplers.euler_maruyama_step(
        sde.reverse(lambda x_, t_: sc), torch.from_numpy(xn), tt, dt, torch.from_numpy(zn)
    )
    _check(out, ref, core.numpy(), x, magnitude(lambda x_, s_, z_: em_ref(coefs, x_, tnp(tt), dt, s_, z_), xn, sn, zn))


@settings(KSET)
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32),
    h=st.floats(1e-6, 1.0),
    per_sample=st.booleans(),
)
def test_langevin_matches_reference(path, shape, dtype, seed, h, per_sample):
    _, dev = path
    (x, score, z), (xn, sn, zn) = make(shape, dtype, dev, seed, 3)
    hh = torch.linspace(h, 2 * h, shape[0], dtype=torch.float64) if per_sample else h
    out = K.langevin_step(x, score, hh.to(dev) if per_sample else hh, noise=z)
    ref = langevin_ref(xn, sn, tnp(hh), zn)
    core = samplers.langevin_step(torch.from_numpy(xn), torch.from_numpy(sn), hh, torch.from_numpy(zn))
    _check(out, ref, core.numpy(), x, magnitude(lambda x_, s_, z_: langevin_ref(x_, s_, tnp(hh), z_), xn, sn, zn))


# ----------------------------------------------------------------------------- in-kernel noise
def _steps(s, sde):
    return {
        "ddpm": lambda x, m, **kw: K.ddpm_step(s, x, torch.tensor([5, 60, 99], device=x.device), m, **kw),
        "ddpm_clip": lambda x, m, **kw: K.ddpm_step(s, x, 40, m, clip_x0=1.0, variance="large", **kw),
        "ddim": lambda x, m, **kw: K.ddim_step(s, x, torch.tensor([50, 60, 99], device=x.device), 30, m, eta=0.7, **kw),
        "em": lambda x, m, **kw: K.euler_maruyama_step(sde, x, 0.5, -0.01, m, **kw),
        "langevin": lambda x, m, **kw: K.langevin_step(x, m, torch.tensor([0.1, 0.2, 0.3], device=x.device), **kw),
    }


@pytest.mark.parametrize("name", ["ddpm", "ddpm_clip", "ddim", "em", "langevin"])
@pytest.mark.parametrize("shape,offset", [((3, 7, 5), 0), ((3, 2051), 6)])
def test_in_kernel_noise_is_the_stream(path, name, shape, offset):
    p, dev = path
    step = _steps(dm.linear_schedule(100), sde_mod.VPSDE())[name]
    (x, m), _ = make(shape, torch.float32, dev, 5, 2)
    a = step(x, m, seed=99, offset=offset)
    b = step(x, m, noise=K.randn(shape, 99, offset, device=dev))
    if p == "triton":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    assert torch.equal(a, step(x, m, seed=99, offset=offset))
    assert not torch.equal(a, step(x, m, seed=99, offset=offset + x.numel()))


@pytest.mark.parametrize("shape,offset", [((3, 7, 5), 0), ((3, 2051), 6)])
def test_in_kernel_noise_is_the_reference_stream(triton_path, shape, offset):
    """Independent check of the steps' in-kernel noise on the two per-sample grids (DDPM with a
    tensor t gathers from a table, Langevin with per-sample step sizes reads folded arrays):
    with x = 0 and model output 0 the step returns c_b z, and z must be Philox draw offset + i of
    the numpy reference stream."""
    s = dm.linear_schedule(100)
    zero = torch.zeros(shape, device=triton_path)
    t = torch.tensor([5, 60, 99])
    h = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    std = np.exp(0.5 * s.posterior_log_variance_clipped[t.numpy()])
    outs = {
        "ddpm": (K.ddpm_step(s, zero, t.to(triton_path), zero, seed=99, offset=offset), std),
        "langevin": (K.langevin_step(zero, zero, h.to(triton_path), seed=99, offset=offset), np.sqrt(h.numpy())),
    }
    ref = stream_normal(99, offset, zero.numel())
    for name, (out, c) in outs.items():
        z = out.cpu().double().numpy() / c.reshape((-1,) + (1,) * (len(shape) - 1))
        d = np.abs(z.reshape(-1) - ref)
        assert np.median(d) < 1e-6 and d.max() < 1e-4, (name, np.median(d), d.max())


@pytest.mark.parametrize("name", ["ddpm", "ddim", "em", "langevin"])
def test_non_contiguous_inputs(path, name):
    _, dev = path
    step = _steps(dm.linear_schedule(100), sde_mod.VPSDE())[name]
    (bx, bm), _ = make((3, 6, 6), torch.float32, dev, 6, 2)
    x, m = bx[:, ::2], bm.transpose(1, 2)[:, :3]
    assert not x.is_contiguous() and not m.is_contiguous()
    assert torch.equal(step(x, m, seed=1), step(x.contiguous(), m.contiguous(), seed=1))


def test_langevin_stationary_variance_monte_carlo(path):
    """Independent check of the noisy update's law: ULA on N(0, s2) with score -x/s2 is the AR(1)
    chain x' = (1 - h/(2 s2)) x + sqrt(h) z, stationary variance s2 / (1 - h/(4 s2)). 4096 chains,
    40 steps from the stationary law, in-kernel noise advancing offset each step; the sample
    variance must match within 5 standard errors (chi-square: se = var sqrt(2/n))."""
    _, dev = path
    s2, h, n = 2.0, 0.5, 4096
    v = s2 / (1 - h / (4 * s2))
    x = K.randn((n,), 1, 0, device=dev) * math.sqrt(v)
    for k in range(40):
        x = K.langevin_step(x, -x / s2, h, seed=2, offset=k * n)
    var = x.double().var().item()
    assert abs(var - v) < 5 * v * math.sqrt(2 / n)


@pytest.mark.parametrize("name", ["ddpm", "ddpm_clip", "ddim", "em", "langevin"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_and_kernel_agree_with_explicit_noise(triton_path, monkeypatch, name, dtype):
    """With noise= the Triton kernel and the torch path compute the same update up to float32
    rounding (then the output dtype's rounding)."""
    step = _steps(dm.linear_schedule(100), sde_mod.VPSDE())[name]
    (x, m, z), _ = make((3, 5, 41), dtype, triton_path, 8, 3)
    a = step(x, m, noise=z).cpu().float()
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    b = step(x.cpu(), m.cpu(), noise=z.cpu()).float()
    eps = torch.finfo(dtype).eps
    assert (a - b).abs().max() <= 4 * eps * (1 + b.abs().max()), (a - b).abs().max()


# ----------------------------------------------------------------------------- mixed precision
def _mixed_steps(s, sde, tt):
    """Each step on (x, model output m, noise z) with a per-sample t where it takes one, and
    its float64 reference; DDPM with clipping also gives the unclipped reference, whose terms
    set the error scale (``magnitude``: the clip passes on x0's rounding)."""
    return {
        "ddpm": (
            lambda x, m, z: K.ddpm_step(s, x, tt(torch.tensor([5, 60, 99])), m, noise=z),
            lambda xn, mn, zn: ddpm_ref(s.betas, xn, np.array([5, 60, 99]), mn, zn),
        ),
        "ddpm_clip": (
            lambda x, m, z: K.ddpm_step(s, x, 40, m, noise=z, clip_x0=1.0, variance="large"),
            lambda xn, mn, zn: ddpm_ref(s.betas, xn, 40, mn, zn, "large", 1.0),
            lambda xn, mn, zn: ddpm_ref(s.betas, xn, 40, mn, zn, "large", None),
        ),
        "ddim": (
            lambda x, m, z: K.ddim_step(s, x, tt(torch.tensor([50, 60, 99])), 30, m, noise=z, eta=0.7),
            lambda xn, mn, zn: ddim_ref(s.betas, xn, np.array([50, 60, 99]), 30, mn, zn, 0.7),
        ),
        "em": (
            lambda x, m, z: K.euler_maruyama_step(sde, x, 0.5, -0.01, m, noise=z),
            lambda xn, mn, zn: em_ref(vp_coefs, xn, 0.5, -0.01, mn, zn),
        ),
        "langevin": (
            lambda x, m, z: K.langevin_step(x, m, 0.1, noise=z),
            lambda xn, mn, zn: langevin_ref(xn, mn, 0.1, zn),
        ),
    }


@pytest.mark.parametrize("name", ["ddpm", "ddpm_clip", "ddim", "em", "langevin"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state", [torch.float32, torch.float64])
def test_half_precision_model_output_on_a_float32_state(path, name, half, state):
    # Issue 16: a sampler step on a float32 (or float64) state with a bfloat16/float16 model output
    # (and noise) reads the half-precision values and writes the state's dtype: the result is
    # the float64 reference on the rounded inputs to the state's precision (1e-6 for float32),
    # not rounded to the half dtype (~4e-3). float64 states run on the torch path only.
    p, dev = path
    if state == torch.float64 and p == "triton":
        pytest.skip("the Triton kernels take float32/16-bit states; float64 runs on the torch path")
    step, ref_fn, *unclipped = _mixed_steps(dm.linear_schedule(100), sde_mod.VPSDE(), lambda t: t.to(dev))[name]
    (x,), (xn,) = make((3, 5, 41), state, dev, 11, 1)
    (m, z), (mn, zn) = make((3, 5, 41), half, dev, 12, 2)
    out = step(x, m, z)
    assert out.dtype == state and out.shape == x.shape
    ref = ref_fn(xn, mn, zn)
    o = out.cpu().double().numpy()
    err = rel_err(o, ref, magnitude((unclipped or [ref_fn])[0], xn, mn, zn))
    assert err <= (1e-6 if state == torch.float32 else 1e-12), err
    # the same step with the output rounded to the half dtype would be off by ~its epsilon
    assert rel_err(out.to(half).cpu().double().numpy(), ref) > 1e-5
