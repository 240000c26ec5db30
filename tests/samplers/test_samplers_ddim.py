"""DDIM steps against DDIM eq. 12/16 evaluated in mpmath from the betas, and eta = 1 against
the posterior variance of the respaced DDPM chain."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from diffmath.samplers import ddim_coefs, ddim_step, ddpm_step, sample_ddim
from diffmath.schedules import Schedule, linear_schedule, timesteps
from tests._tables import refusals
from tests.reference._ref import linspace_betas


def _ref(betas, t, tp, x, e, z, eta):
    mp.mp.dps = 50
    ab = mp.mpf(1)
    abars = []
    for b in betas:
        ab *= 1 - mp.mpf(float(b))
        abars.append(ab)
    a_t = abars[t]
    a_p = abars[tp] if tp >= 0 else mp.mpf(1)
    sigma = eta * mp.sqrt((1 - a_p) / (1 - a_t)) * mp.sqrt(1 - a_t / a_p)
    out = []
    for xi, ei, zi in zip(x, e, z):
        xi, ei, zi = mp.mpf(float(xi)), mp.mpf(float(ei)), mp.mpf(float(zi))
        x0 = (xi - mp.sqrt(1 - a_t) * ei) / mp.sqrt(a_t)
        out.append(mp.sqrt(a_p) * x0 + mp.sqrt(1 - a_p - sigma**2) * ei + sigma * zi)
    return np.array([float(v) for v in out]), float(sigma)


@settings(max_examples=40, deadline=None)
@given(
    betas=linspace_betas(T=(2, 2000), lo=(1e-10, 1e-2), hi=(1e-4, 0.5)),
    f1=st.floats(0, 1),
    f2=st.floats(0, 1),
    eta=st.sampled_from([0.0, 0.2, 0.5, 1.0]) | st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_ddim_step_is_eq12(betas, f1, f2, eta, seed):
    s = Schedule.from_betas(betas)
    T = s.num_timesteps
    t = min(int(f1 * T), T - 1)
    tp = min(int(f2 * t), t - 1) if t > 0 else -1
    assume(s.alphas_cumprod[t] > 1e-20)
    rng = np.random.default_rng(seed)
    x, e, z = rng.normal(size=(3, 4))
    ref, sigma_ref = _ref(betas, t, tp, x, e, z, eta)
    ours = ddim_step(s, x, t, tp, e, noise=z, eta=eta)
    scale = (np.abs(x) + np.abs(e)).max() / np.sqrt(s.alphas_cumprod[t]) + 1
    assert_allclose(ours, ref, rtol=1e-11, atol=1e-13 * scale)
    # sigma keeps full relative precision even for betas near 1e-10 (no 1 - ratio cancellation)
    assert_allclose(float(ddim_coefs(s, t, tp, eta)[2]), sigma_ref, rtol=1e-12, atol=1e-300)


def test_eta_one_is_ddpm_on_the_respaced_chain():
    # DDIM (eta = 1) from t to t_prev == the DDPM step of the two-point respaced schedule
    # with variance "small": sigma^2 = beta_tilde of that chain (DDIM Sec. 4.1).
    s = linear_schedule(1000)
    rng = np.random.default_rng(1)
    x, e, z = rng.normal(size=(3, 6))
    for t, tp in ((999, 899), (500, 10), (40, 0)):
        sr = s.respace([tp, t])
        assert_allclose(float(ddim_coefs(s, t, tp, 1.0)[2]) ** 2, sr.posterior_variance[1], rtol=1e-12)
        assert_allclose(
            ddim_step(s, x, t, tp, e, z, eta=1.0), ddpm_step(sr, x, 1, e, z, "small"), rtol=1e-12, atol=1e-14
        )


def test_final_step_returns_x0_and_needs_no_noise():
    s = linear_schedule(1000)
    x, e = np.array([[0.5, -1.0]]), np.array([[0.2, 0.3]])
    x0 = (x - np.sqrt(1 - s.alphas_cumprod[3]) * e) / np.sqrt(s.alphas_cumprod[3])
    assert_allclose(ddim_step(s, x, 3, -1, e, eta=1.0), x0, rtol=1e-13)
    assert_allclose(
        ddim_step(s, x, 3, 1, e, eta=0.0), ddim_step(s, x, 3, 1, e, noise=np.full_like(x, 9.0), eta=0.0), rtol=0
    )


def test_batched_t_and_t_prev():
    s = linear_schedule(100)
    rng = np.random.default_rng(2)
    x, e, z = rng.normal(size=(3, 3, 2))
    t, tp = np.array([99, 50, 1]), np.array([89, -1, 0])
    out = ddim_step(s, x, t, tp, e, z, eta=0.7)
    for i in range(3):
        assert_allclose(
            out[i],
            ddim_step(s, x[i : i + 1], int(t[i]), int(tp[i]), e[i : i + 1], z[i : i + 1], eta=0.7)[0],
            rtol=1e-14,
        )
    outt = ddim_step(s, torch.tensor(x), torch.tensor(t), torch.tensor(tp), torch.tensor(e), torch.tensor(z), eta=0.7)
    assert_allclose(outt.numpy(), out, rtol=1e-13)


def test_sample_ddim_calls_model_on_the_spacing():
    s = linear_schedule(1000)
    for spacing in ("leading", "trailing", "linspace"):
        seen = []

        def model(x, t):
            seen.append(int(t[0]))
            return np.zeros_like(x)

        sample_ddim(model, s, (2, 2), steps=7, spacing=spacing, eta=0.5, generator=np.random.default_rng(0))
        assert seen == timesteps(1000, 7, spacing).tolist()


# ----------------------------------------------------------------------------- bad input
_S50, _X = linear_schedule(50), np.ones((2, 3))


def _identity(y, t):
    return y


BAD_INPUT = [
    (
        ddim_step,
        dict(s=_S50, x_t=_X, t=10, t_prev=5, eps=_X, eta=-0.1),
        ValueError,
        r"eta must be finite and >= 0.*eta = -0.1",
    ),
    (ddim_step, dict(s=_S50, x_t=_X, t=10, t_prev=10, eps=_X), ValueError, r"t_prev must be < t.*t = 10, t_prev = 10"),
    (
        ddim_step,
        dict(s=_S50, x_t=_X, t=np.array([10, 3]), t_prev=np.array([5, 7]), eps=_X),
        ValueError,
        r"t_prev must be < t.*t = 3, t_prev = 7",
    ),
    (ddim_step, dict(s=_S50, x_t=_X, t=10, t_prev=-2, eps=_X), ValueError, r"t_prev must lie in \[-1, 50\).*-2"),
    (ddim_step, dict(s=_S50, x_t=_X, t=10, t_prev=5, eps=_X, eta=0.5), ValueError, "noise is required"),
    (ddim_step, dict(s=_S50, x_t=_X, t=49, t_prev=0, eps=_X, noise=_X, eta=3.0), ValueError, "use eta in"),
    (
        sample_ddim,
        dict(eps_model=_identity, s=_S50, shape=(2, 3), steps=51),
        ValueError,
        r"steps must lie in \[1, 50\]; got steps = 51",
    ),
    (
        sample_ddim,
        dict(eps_model=_identity, s=_S50, shape=(2, 3), steps=0),
        ValueError,
        r"steps must lie in \[1, 50\]; got steps = 0",
    ),
    (
        sample_ddim,
        dict(eps_model=_identity, s=_S50, shape=(2, 3), eta=-1.0),
        ValueError,
        r"eta must be finite and >= 0.*eta = -1.0",
    ),
    (
        sample_ddim,
        dict(eps_model=_identity, s=_S50, shape=(2, 3), steps=5, spacing="odd"),
        ValueError,
        "unknown spacing 'odd'",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
