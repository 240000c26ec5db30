"""The posterior q(x_{t-1} | x_t, x_0) is Bayes' rule applied to the forward process."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import stats

import diffmath as dm
from diffmath.parameterization import x0_from_eps
from diffmath.posterior import posterior_mean_from_eps, q_posterior_mean, q_posterior_mean_variance
from tests._tables import refusals
from tests.reference._ref import abar_by_product, schedules


@given(s=schedules(max_T=2000, lo_min=1e-5), t_frac=st.floats(0, 1), x0=st.floats(-3, 3), xt=st.floats(-4, 4))
def test_posterior_is_bayes_rule(s, t_frac, x0, xt):
    # log q(x_{t-1}|x_t,x0) = log q(x_t|x_{t-1}) + log q(x_{t-1}|x0) - log q(x_t|x0), each side
    # evaluated with scipy.stats.norm.logpdf at several x_{t-1} (0-based t >= 1).
    T = s.num_timesteps
    if T < 2:
        return
    t = 1 + int(t_frac * (T - 2))
    b = s.betas[t]
    ab_prev, ab = abar_by_product(s.betas, t - 1), abar_by_product(s.betas, t)
    # 1 - abar as -expm1(sum log1p(-beta)): 1 - ab by subtraction loses ~eps/(1 - ab) relative,
    # and x_t^2 / (2 (1 - ab)) ~ 2e5 at beta ~ 1e-5 turns that into 1e-6 of log-density.
    one_minus = lambda k: -np.expm1(np.sum(np.log1p(-s.betas[: k + 1])))  # noqa: E731
    mean, var, logv = q_posterior_mean_variance(s, np.array([x0]), np.array([xt]), t)
    sd = np.sqrt(var[0])
    xs = mean[0] + sd * np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    bayes = (
        stats.norm.logpdf(xt, np.sqrt(1 - b) * xs, np.sqrt(b))
        + stats.norm.logpdf(xs, np.sqrt(ab_prev) * x0, np.sqrt(one_minus(t - 1)))
        - stats.norm.logpdf(xt, np.sqrt(ab) * x0, np.sqrt(one_minus(t)))
    )
    ours = stats.norm.logpdf(xs, mean[0], sd)
    scale = 1 + np.abs(bayes).max()
    assert_allclose(ours, bayes, rtol=0, atol=1e-7 * scale)
    assert_allclose(np.exp(logv), var, rtol=1e-12)
    # the mean-only entry point gives the same mean, without the two full-size variance arrays
    assert_allclose(q_posterior_mean(s, np.array([x0]), np.array([xt]), t), mean, rtol=0, atol=0)


def test_posterior_at_t0_is_the_data_point():
    s = dm.linear_schedule(100)
    x0, xt = np.array([0.3, -0.7]), np.array([1.0, 2.0])
    mean, var, logv = q_posterior_mean_variance(s, x0, xt, 0)
    # coef1[0] = beta_0 / (1 - abar_0) = 1 up to two libm calls (log1p, expm1: 4 ulp each,
    # docs/numerics.md) and two roundings; coef2[0] = 0 exactly
    libm = 4 * 2.0**-52
    assert_allclose(mean, x0, rtol=2 * libm + 2 * 2.0**-52)
    assert np.all(var == 0)
    # clipped (Improved DDPM): log beta_1 + log(1 - abar_0) - log(1 - abar_1) (about 5 libm calls
    # on terms of magnitude 7.8 to 9.2) against the log of beta_1 (1 - abar_0) / (1 - abar_1)
    # (about 4 more), a result of magnitude 9.5: within 6 x 4 ulp relative
    assert_allclose(logv, np.log(s.posterior_variance[1]), rtol=6 * libm)


@given(s=schedules(max_T=10_000), data=st.data())
def test_eps_form_of_the_mean_equals_x0_form(s, data):
    T_pos = int(np.count_nonzero(s.alphas_cumprod > 0))  # abar can underflow to 0 at the end
    t = np.array(data.draw(st.lists(st.integers(0, T_pos - 1), min_size=3, max_size=3)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    xt, eps = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    by_x0 = q_posterior_mean_variance(s, x0_from_eps(s, xt, t, eps), xt, t)[0]
    by_eps = posterior_mean_from_eps(s, xt, t, eps)
    scale = np.abs(by_eps).max(axis=1, keepdims=True) + np.abs(xt).max()
    finite = np.isfinite(s.sqrt_recip_alphas_cumprod[t])  # 1/sqrt(abar) can overflow for abar ~ 1e-320
    if finite.any():
        assert_allclose(by_x0[finite], by_eps[finite], rtol=0, atol=(1e-10 * scale)[finite].max())


def test_posterior_mean_from_eps_is_finite_up_to_zero_terminal_snr():
    # finite one step before abar_t = 0 (the step at abar_t = 0 itself is refused: BAD_INPUT)
    s = dm.rescale_zero_terminal_snr(dm.linear_schedule(10))
    x = np.ones((2, 3))
    assert np.isfinite(posterior_mean_from_eps(s, x, 8, x)).all()


# ----------------------------------------------------------------------------- bad input
BAD_INPUT = [
    # at abar_t = 0 (beta_t = 1) the step divides by sqrt(alpha_t) = 0: it returned +-inf or NaN
    (
        posterior_mean_from_eps,
        dict(s=dm.rescale_zero_terminal_snr(dm.linear_schedule(10)), x_t=np.ones((2, 3)), t=9, eps=np.ones((2, 3))),
        ValueError,
        "posterior_mean_from_eps is undefined at t = 9",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
