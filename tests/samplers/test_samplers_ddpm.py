"""DDPM ancestral steps against Bayes' rule evaluated in mpmath from the betas alone
(Ho et al. 2020, eq. 6-7), and the loop's respacing against Improved DDPM's definition."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from diffmath.samplers import ddpm_std, ddpm_step, sample_ddpm
from diffmath.schedules import Schedule, cosine_schedule, linear_schedule, timesteps
from tests._tables import refusals
from tests.reference._ref import linspace_betas


def _ref_step(betas, t, x_t, eps, noise, variance, clip=None):
    """x_{t-1} from Bayes: q(x_{t-1} | x_t, x0) prop. to q(x_t | x_{t-1}) q(x_{t-1} | x0)."""
    mp.mp.dps = 40
    b = [mp.mpf(float(v)) for v in betas]
    abar = mp.mpf(1)
    for j in range(t + 1):
        abar *= 1 - b[j]
    abar_prev = abar / (1 - b[t])
    out = []
    for xi, ei, ni in zip(x_t, eps, noise):
        x0 = (mp.mpf(float(xi)) - mp.sqrt(1 - abar) * mp.mpf(float(ei))) / mp.sqrt(abar)
        if clip is not None:
            x0 = min(max(x0, -clip), clip)
        if t == 0:
            out.append(x0)
            continue
        prec = 1 / (1 - abar_prev) + (1 - b[t]) / b[t]
        mean = (mp.sqrt(abar_prev) * x0 / (1 - abar_prev) + mp.sqrt(1 - b[t]) * mp.mpf(float(xi)) / b[t]) / prec
        std = mp.sqrt(1 / prec) if variance == "small" else mp.sqrt(b[t])
        out.append(mean + std * mp.mpf(float(ni)))
    return np.array([float(v) for v in out])


@settings(max_examples=40, deadline=None)
@given(
    betas=linspace_betas(T=(1, 1500), lo=(1e-7, 1e-2), hi=(1e-3, 0.999)),
    frac=st.floats(0, 1),
    variance=st.sampled_from(["small", "large"]),
    seed=st.integers(0, 2**16),
)
def test_ddpm_step_is_bayes_rule(betas, frac, variance, seed):
    s = Schedule.from_betas(betas)
    T = s.num_timesteps
    t = min(int(frac * T), T - 1)
    assume(s.alphas_cumprod[t] > 1e-20)
    rng = np.random.default_rng(seed)
    x, e, z = rng.normal(size=(3, 5))
    ours = ddpm_step(s, x, t, e, z, variance=variance)
    ref = _ref_step(betas, t, x, e, z, variance)
    scale = (np.abs(x) + np.abs(e)) / np.sqrt(s.alphas_cumprod[t]) + 1
    assert_allclose(ours, ref, rtol=1e-11, atol=1e-12 * scale.max())


def test_no_noise_at_t0_and_clipping():
    s = linear_schedule(100)
    x, e = np.array([0.3, -2.0, 5.0]), np.array([40.0, -40.0, 0.1])
    z = np.ones(3)
    assert_allclose(ddpm_step(s, x, 0, e, z), ddpm_step(s, x, 0, e, None), rtol=0, atol=0)
    assert_allclose(ddpm_step(s, x, 0, e, None), _ref_step(s.betas, 0, x, e, z, "small"), rtol=1e-12)
    for t in (0, 1, 50):
        ours = ddpm_step(s, x, t, e, z, variance="large", clip_x0=1.0)
        assert_allclose(ours, _ref_step(s.betas, t, x, e, z, "large", clip=1.0), rtol=1e-11, atol=1e-13)


def test_ddpm_std_is_the_posterior_or_beta_std_and_a_fresh_copy():
    # "small": sqrt(beta_t (1 - abar_{t-1}) / (1 - abar_t)) (DDPM eq. 7), "large": sqrt(beta_t),
    # both 0 at t = 0; in 40-digit mpmath from the betas.
    mp.mp.dps = 40
    s = cosine_schedule(50)
    b = [mp.mpf(float(v)) for v in s.betas]
    abar, ref_small = [], [0.0]
    for bt in b:
        abar.append((abar[-1] if abar else 1) * (1 - bt))
    for t in range(1, 50):
        ref_small.append(float(mp.sqrt(b[t] * (1 - abar[t - 1]) / (1 - abar[t]))))
    assert_allclose(ddpm_std(s, "small"), ref_small, rtol=1e-13, atol=0)
    # exact by construction: sqrt is correctly rounded by IEEE 754 on every CPU (no libm approximation)
    assert_allclose(ddpm_std(s, "large"), [0.0] + [float(mp.sqrt(v)) for v in b[1:]], rtol=1e-15, atol=0)
    # ddpm_step reads a table cached per schedule: a caller's copy can be changed freely
    x, e, z = np.random.default_rng(2).normal(size=(3, 4))
    before = ddpm_step(s, x, 30, e, z)
    std = ddpm_std(s)
    std[:] = 0.0
    assert_allclose(ddpm_step(s, x, 30, e, z), before, rtol=0, atol=0)
    assert ddpm_std(s)[30] > 0


def test_batched_t_matches_per_sample_calls_and_torch():
    s = cosine_schedule(200)
    rng = np.random.default_rng(0)
    x, e, z = rng.normal(size=(3, 4, 2, 2))
    t = np.array([0, 1, 100, 199])
    out = ddpm_step(s, x, t, e, z, variance="small")
    for i in range(4):
        assert_allclose(out[i], ddpm_step(s, x[i : i + 1], int(t[i]), e[i : i + 1], z[i : i + 1])[0], rtol=1e-14)
    tt = ddpm_step(s, torch.tensor(x), torch.tensor(t), torch.tensor(e), torch.tensor(z))
    assert_allclose(tt.numpy(), out, rtol=1e-13)
    t32 = ddpm_step(
        s,
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(t),
        torch.tensor(e, dtype=torch.float32),
        torch.tensor(z, dtype=torch.float32),
    )
    assert t32.dtype == torch.float32
    assert float((t32.double() - tt).norm() / tt.norm()) < 1e-6


def test_sample_ddpm_respaced_calls_the_model_with_original_indices():
    s = linear_schedule(1000)
    seen = []

    def model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == np.int64
        seen.append(int(t[0]))
        return np.zeros_like(x)

    for spacing in ("leading", "trailing", "linspace"):
        seen.clear()
        sample_ddpm(model, s, (3, 2), steps=25, spacing=spacing, generator=np.random.default_rng(0))
        assert seen == timesteps(1000, 25, spacing).tolist()


def test_sample_ddpm_respaced_equals_a_hand_loop_of_the_posterior_formula():
    # DDPM with `steps` (Improved DDPM, Sec. 4), written out here from the posterior of the
    # respaced chain: for the kept indices t_1 < ... < t_n, beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}
    # (abar_{t_0} = 1), x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) and (Ho et al. 2020, eq. 7)
    #   mean = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar) x,
    # plus sqrt(beta) z ("large") except at the last level. Same generator draws: x_T first,
    # then one z per level with t > 0.
    s = linear_schedule(1000)
    ts = np.arange(0, 1000, 100)  # "leading" spacing (Improved DDPM / DDIM): 0, 100, ..., 900
    assert np.array_equal(np.sort(timesteps(1000, 10, "leading")), ts)
    abar_all = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))  # Ho et al.'s linear betas
    assert_allclose(s.alphas_cumprod, abar_all, rtol=1e-12)

    def model(x, t):
        return 0.1 * x + 0.01 * t[:, None]

    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3))
    for i in range(len(ts) - 1, -1, -1):
        abar = abar_all[ts[i]]
        abar_prev = abar_all[ts[i - 1]] if i > 0 else 1.0
        beta = 1.0 - abar / abar_prev
        e = model(x, np.full(4, ts[i], dtype=np.int64))
        x0 = (x - np.sqrt(1 - abar) * e) / np.sqrt(abar)
        mean = np.sqrt(abar_prev) * beta / (1 - abar) * x0 + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x
        x = mean + np.sqrt(beta) * rng.standard_normal((4, 3)) if i > 0 else mean
    a = sample_ddpm(model, s, (4, 3), steps=10, variance="large", generator=np.random.default_rng(5))
    assert_allclose(a, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loop", ["ddpm", "ddpm_respaced", "ddim"])
def test_loops_refuse_zero_terminal_snr_before_the_first_model_call(loop):
    """abar_T-1 = 0 makes x0 undefined from eps at the first step; the loops check every step's
    abar_t once, before calling the model (docs/design.md, "Validation")."""
    from diffmath.samplers import sample_ddim
    from diffmath.schedules import rescale_zero_terminal_snr

    s = rescale_zero_terminal_snr(linear_schedule(50))
    assert s.alphas_cumprod[-1] == 0 and s.alphas_cumprod[-2] > 0
    calls = []

    def model(x, t):
        calls.append(t)
        return np.zeros_like(x)

    run = {
        "ddpm": lambda: sample_ddpm(model, s, (2, 3), generator=np.random.default_rng(0)),
        "ddpm_respaced": lambda: sample_ddpm(
            model, s, (2, 3), steps=7, spacing="trailing", generator=np.random.default_rng(0)
        ),
        "ddim": lambda: sample_ddim(model, s, (2, 3), steps=10, spacing="trailing", generator=np.random.default_rng(0)),
    }[loop]
    last = 6 if loop == "ddpm_respaced" else 49  # the respaced chain's own index of t = 49
    with pytest.raises(ValueError, match=f"undefined at t = {last}, where alphas_cumprod = 0"):
        run()
    assert calls == []


# ----------------------------------------------------------------------------- bad input
_S10, _X = linear_schedule(10), np.ones((2, 3))


def _identity(y, t):
    return y


BAD_INPUT = [
    (ddpm_step, dict(s=_S10, x_t=_X, t=3, eps=_X, noise=None), ValueError, "noise is required"),
    (
        ddpm_step,
        dict(s=_S10, x_t=_X, t=3, eps=_X, noise=_X, variance="medium"),
        ValueError,
        r"variance must be 'small'.*'medium'",
    ),
    (
        ddpm_step,
        dict(s=_S10, x_t=_X, t=3, eps=_X, noise=_X, clip_x0=-1.0),
        ValueError,
        r"clip_x0 must be .*> 0; got clip_x0 = -1.0",
    ),
    (ddpm_step, dict(s=_S10, x_t=_X, t=10, eps=_X, noise=_X), ValueError, r"t must lie in \[0, 10\).*t = 10"),
    (
        sample_ddpm,
        dict(eps_model=_identity, s=_S10, shape=(2, 3), steps=11),
        ValueError,
        r"steps must lie in \[1, 10\]; got steps = 11",
    ),
    (
        sample_ddpm,
        dict(eps_model=_identity, s=_S10, shape=(2, 3), steps=0),
        ValueError,
        r"steps must lie in \[1, 10\]; got steps = 0",
    ),
    (
        sample_ddpm,
        dict(eps_model=lambda y, t: y[:, :1], s=_S10, shape=(2, 3)),
        ValueError,
        r"eps_model returned shape \(2, 1\) but x has shape \(2, 3\)",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
