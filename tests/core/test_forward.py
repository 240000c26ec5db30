"""Forward process: the closed form q(x_t | x_0) is the composition of single steps."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import stats

import diffmath as dm
from diffmath.forward import q_mean_variance, q_sample, q_step_sample
from tests._tables import refusals
from tests.reference._ref import abar_by_product, schedule_and_t


@given(st_=schedule_and_t(max_T=10_000), x0=st.floats(-5, 5))
def test_closed_form_is_composition_of_single_steps(st_, x0):
    # Propagate N(m, v) through x_j = sqrt(1 - beta_j) x_{j-1} + sqrt(beta_j) z, j = 0..t,
    # starting from the point mass at x0: m_j = sqrt(alpha_j) m_{j-1}, v_j = alpha_j v_{j-1} + beta_j.
    s, t = st_
    m, v = x0, 0.0
    for b in s.betas[: t + 1].tolist():
        m = np.sqrt(1 - b) * m
        v = (1 - b) * v + b
    mean, var, log_var = q_mean_variance(s, np.full((2, 3), x0), t)
    assert_allclose(mean, m, rtol=1e-11, atol=1e-300)
    assert_allclose(var, v, rtol=1e-11)
    assert_allclose(np.exp(log_var), v, rtol=1e-11)
    assert mean.shape == var.shape == log_var.shape == (2, 3)


def test_q_sample_and_composed_steps_share_the_marginal():
    # Monte Carlo: t+1 single steps and one q_sample give the same distribution; KS test
    # of each against the closed-form normal (n = 20,000, seed fixed, reject at p < 1e-3).
    s = dm.linear_schedule(200, 1e-3, 0.2)
    t, n, x0 = 7, 20_000, 0.8
    rng = np.random.default_rng(0)
    x = np.full(n, x0)
    for j in range(t + 1):
        x = q_step_sample(s, x, j, rng.standard_normal(n))
    direct = q_sample(s, np.full(n, x0), t, rng.standard_normal(n))
    ab = abar_by_product(s.betas, t)
    ref = stats.norm(np.sqrt(ab) * x0, np.sqrt(1 - ab))
    assert stats.kstest(x, ref.cdf).pvalue > 1e-3
    assert stats.kstest(direct, ref.cdf).pvalue > 1e-3
    assert stats.ks_2samp(x, direct).pvalue > 1e-3


def test_q_sample_per_sample_timesteps():
    s = dm.cosine_schedule(50)
    x0 = np.linspace(-1, 1, 12).reshape(4, 3)
    eps = np.ones_like(x0)
    t = np.array([0, 10, 49, 3])
    out = q_sample(s, x0, t, eps)
    for i, ti in enumerate(t):
        ab = abar_by_product(s.betas, ti)
        assert_allclose(out[i], np.sqrt(ab) * x0[i] + np.sqrt(1 - ab), rtol=1e-12)


def test_q_step_sample_at_t0_starts_from_x0():
    s = dm.linear_schedule(10)
    out = q_step_sample(s, np.array([2.0]), 0, np.array([1.0]))
    assert_allclose(out, np.sqrt(1 - 1e-4) * 2 + np.sqrt(1e-4), rtol=1e-14)


# ----------------------------------------------------------------------------- bad input
def _bad_forward_calls(fn, x_name):
    """The same refusals from q_sample (x = x0) and q_step_sample (x = x_prev)."""
    s, x = dm.linear_schedule(10), np.zeros((3, 2))

    def kw(x_, t, noise):
        return {"s": s, x_name: x_, "t": t, "noise": noise}

    return [
        (fn, kw(x, 10, x), ValueError, r"t must lie in \[0, 10\) for a schedule of 10 steps; got t = 10"),
        (fn, kw(x, np.array([0, -1, 2]), x), ValueError, r"t must lie in \[0, 10\).*got t = -1"),
        (fn, kw(x, np.array([1, 2]), x), ValueError, "a batch of 2 timesteps t must match the batch of x"),
        (fn, kw(np.zeros((3, 2), dtype=np.int64), 1, x), TypeError, "must be a floating-point array; got dtype int64"),
        (fn, kw(x, 1, np.zeros((3, 1))), ValueError, r"noise must have the shape .* \(3, 2\); got \(3, 1\)"),
        (fn, kw(x, 1.5, x), TypeError, "t must be an integer timestep index"),
    ]


BAD_INPUT = [*_bad_forward_calls(q_sample, "x0"), *_bad_forward_calls(q_step_sample, "x_prev")]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
