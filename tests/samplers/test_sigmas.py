"""Sigma ladders (diffmath.samplers.sigmas) against hand-derived values, numpy's geomspace,
40-digit mpmath and the schedule's abar by a plain product."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from diffmath.samplers import (
    sigmas_beta,
    sigmas_exponential,
    sigmas_from_schedule,
    sigmas_karras,
    sigmas_polyexponential,
    sigmas_vp,
)
from diffmath.schedules import Schedule, linear_schedule, rescale_zero_terminal_snr, timesteps
from tests._tables import refusals
from tests.reference._ref import abar_by_product

# Results go through pow/exp/log of numpy: a few ulp apart per CPU (SIMD libm), so 1e-14, not 1e-16.
RTOL = 1e-14

LADDERS = [
    lambda n: sigmas_karras(n, 0.002, 80.0),
    lambda n: sigmas_exponential(n, 0.01, 157.4),
    lambda n: sigmas_polyexponential(n, 0.01, 157.4, rho=2.0),
    lambda n: sigmas_vp(n),
    lambda n: sigmas_from_schedule(linear_schedule(1000), n, "trailing"),
]


@pytest.mark.parametrize("make", LADDERS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_ladder_shape_dtype_final_zero(make, n):
    sig = make(n)
    assert sig.dtype == np.float64 and sig.shape == (n + 1,)
    assert sig[-1] == 0.0
    assert np.all(np.diff(sig) < 0) and np.all(sig[:-1] > 0)


def test_karras_by_hand():
    # EDM eq. 5 with n = 3, rho = 2: sigma^(1/2) equally spaced between sqrt(80) and sqrt(0.02)
    sig = sigmas_karras(3, 0.02, 80.0, rho=2.0)
    mid = ((math.sqrt(80.0) + math.sqrt(0.02)) / 2) ** 2
    assert_allclose(sig, [80.0, mid, 0.02, 0.0], rtol=RTOL)
    # rho = 1 is uniform in sigma
    assert_allclose(sigmas_karras(5, 1.0, 5.0, rho=1.0)[:-1], [5, 4, 3, 2, 1], rtol=RTOL)


@given(n=st.integers(2, 400), smin=st.floats(1e-4, 1.0), ratio=st.floats(1.001, 1e5), rho=st.floats(0.5, 12.0))
def test_karras_endpoints_and_spacing(n, smin, ratio, rho):
    smax = smin * ratio
    sig = sigmas_karras(n, smin, smax, rho)
    assert sig[0] == smax and sig[-2] == smin  # the endpoints are exact
    assert np.all(np.diff(sig) < 0)
    u = sig[:-1] ** (1.0 / rho)
    # equal steps in sigma^(1/rho), up to the rounding of pow (relative to the range of u)
    assert_allclose(np.diff(u), np.full(n - 1, (u[-1] - u[0]) / (n - 1)), rtol=0, atol=1e-11 * u[0])


@given(n=st.integers(2, 300), smin=st.floats(1e-4, 1.0), ratio=st.floats(1.001, 1e5))
def test_exponential_is_geomspace(n, smin, ratio):
    smax = smin * ratio
    sig = sigmas_exponential(n, smin, smax)
    assert_allclose(sig[:-1], np.geomspace(smax, smin, n), rtol=4e-14)  # pow vs exp(log): a few ulp x log range
    assert sig[0] == smax and sig[-2] == smin


def test_polyexponential_by_hand():
    # rho = 1 is the exponential ladder
    assert_allclose(sigmas_polyexponential(9, 0.01, 157.4, 1.0), sigmas_exponential(9, 0.01, 157.4), rtol=RTOL)
    # n = 3, rho = 2: the middle level has log sigma = log smin + (1/2)^2 log(smax / smin)
    sig = sigmas_polyexponential(3, 0.01, 100.0, rho=2.0)
    assert_allclose(sig, [100.0, 0.01 * (100.0 / 0.01) ** 0.25, 0.01, 0.0], rtol=RTOL)


def test_vp_against_mpmath_and_sde():
    mp.mp.dps = 40
    n, beta_d, beta_min, eps_s = 6, 19.9, 0.1, 1e-3
    sig = sigmas_vp(n, beta_d, beta_min, eps_s)
    ts = [mp.mpf(1) + (mp.mpf(eps_s) - 1) * mp.mpf(i) / (n - 1) for i in range(n)]
    ref = [float(mp.sqrt(mp.exp(beta_d * t * t / 2 + beta_min * t) - 1)) for t in ts]
    assert_allclose(sig[:-1], ref, rtol=RTOL)
    # the VP SDE's own marginal: sigma(t) = s(t) / m(t)
    from diffmath.sde import VPSDE

    m, s = VPSDE(beta_min, beta_min + beta_d).marginal_coefs(np.linspace(1.0, eps_s, n))
    assert_allclose(sig[:-1], s / m, rtol=1e-13)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 999])
def test_from_schedule_is_the_table(spacing, steps):
    s = linear_schedule(1000)
    sig = sigmas_from_schedule(s, steps, spacing)
    ts = timesteps(1000, steps, spacing)
    ref = [math.sqrt((1 - abar_by_product(s.betas, int(t))) / abar_by_product(s.betas, int(t))) for t in ts]
    # the plain product loses ~T ulp; the library's table is the precise one
    assert_allclose(sig[:-1], ref, rtol=1e-12)
    assert sig[-1] == 0.0 and sig.shape == (steps + 1,)
    assert_array_equal(sig[:-1], s.sqrt_recipm1_alphas_cumprod[ts])


def test_from_schedule_range_of_linear_1000():
    sig = sigmas_from_schedule(linear_schedule(1000), 1000, "linspace")
    assert_allclose([sig[0], sig[-2]], [157.4072808104074, 0.010000500037503126], rtol=1e-13)


def test_single_level():
    for sig in (sigmas_karras(1, 0.1, 2.0), sigmas_exponential(1, 0.1, 2.0), sigmas_polyexponential(1, 0.1, 2.0)):
        assert_array_equal(sig, [2.0, 0.0])
    assert_allclose(sigmas_vp(1), [math.sqrt(math.expm1(19.9 / 2 + 0.1)), 0.0], rtol=RTOL)
    assert isinstance(sigmas_from_schedule(Schedule.from_betas(np.full(3, 0.5)), 1), np.ndarray)


def test_sigmas_beta_against_closed_forms():
    """Beta(1, 1) is uniform (its quantile is the identity): the ladder is linear in sigma; for
    Beta(1/2, 1/2) the quantile is sin^2(pi u / 2) (the arcsine law), in mpmath."""
    from diffmath.samplers import sigmas_beta

    lin = sigmas_beta(6, 0.1, 5.0, alpha=1.0, beta=1.0)
    assert_allclose(lin[:-1], np.linspace(5.0, 0.1, 6), rtol=4e-15, atol=0)  # a few ulp of the quantile
    assert lin[-1] == 0.0 and lin[0] == 5.0 and lin[-2] == 0.1
    arc = sigmas_beta(7, 0.2, 3.0, alpha=0.5, beta=0.5)
    want = [0.2 + float(mp.sin(mp.pi * (1 - mp.mpf(i) / 6) / 2) ** 2) * 2.8 for i in range(7)]
    assert_allclose(arc[:-1], want, rtol=1e-12)  # scipy's beta quantile is an iterative inverse


# ----------------------------------------------------------------------------- bad input
_ZSNR10 = rescale_zero_terminal_snr(linear_schedule(10))

BAD_INPUT = [
    (sigmas_karras, dict(n=0, sigma_min=0.1, sigma_max=1.0), ValueError, "n must be >= 1"),
    (sigmas_karras, dict(n=2.0, sigma_min=0.1, sigma_max=1.0), TypeError, "n must be an integer"),
    (sigmas_karras, dict(n=True, sigma_min=0.1, sigma_max=1.0), TypeError, "n must be an integer"),
    (sigmas_karras, dict(n=5, sigma_min=1.0, sigma_max=0.1), ValueError, "sigma_min < sigma_max"),
    (sigmas_karras, dict(n=5, sigma_min=0.0, sigma_max=1.0), ValueError, "sigma_min must be finite and > 0"),
    (sigmas_karras, dict(n=5, sigma_min=0.1, sigma_max=math.inf), ValueError, "sigma_max must be finite"),
    (sigmas_karras, dict(n=5, sigma_min=0.1, sigma_max=math.nan), ValueError, "sigma_max must be finite"),
    (sigmas_karras, dict(n=5, sigma_min=0.1, sigma_max=1.0, rho=0.0), ValueError, "rho must be finite and > 0"),
    (sigmas_exponential, dict(n=5, sigma_min=0.5, sigma_max=0.5), ValueError, "sigma_min < sigma_max"),
    (sigmas_exponential, dict(n=5, sigma_min="a", sigma_max=0.5), TypeError, "sigma_min must be a real number"),
    (
        sigmas_polyexponential,
        dict(n=5, sigma_min=0.1, sigma_max=1.0, rho=-1.0),
        ValueError,
        "rho must be finite and > 0",
    ),
    (sigmas_beta, dict(n=4, sigma_min=0.1, sigma_max=1.0, alpha=0.0), ValueError, "alpha"),
    (sigmas_vp, dict(n=5, eps_s=1.0), ValueError, "eps_s must lie in"),
    (sigmas_vp, dict(n=5, eps_s=0.0), ValueError, "eps_s must be finite and > 0"),
    (sigmas_vp, dict(n=5, beta_d=-1.0), ValueError, "beta_d must be finite and >= 0"),
    (sigmas_vp, dict(n=5, beta_d=0.0, beta_min=0.0), ValueError, "cannot both be 0"),
    (sigmas_from_schedule, dict(s=linear_schedule(10), steps=11), ValueError, "num_steps must lie in"),
    (sigmas_from_schedule, dict(s=linear_schedule(10), steps=5, spacing="middle"), ValueError, "unknown spacing"),
    (sigmas_from_schedule, dict(s=np.ones(10), steps=5), TypeError, "Schedule"),
    (sigmas_from_schedule, dict(s=_ZSNR10, steps=5, spacing="trailing"), ValueError, "zero terminal SNR"),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
