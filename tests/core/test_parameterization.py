"""eps <-> x0 <-> v <-> score conversions, against x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
built in the test, and the score against torch autograd of the closed-form log-density."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import diffmath as dm
from diffmath import parameterization as P
from tests._tables import refusals
from tests.reference._ref import abar_by_product, schedule_and_t


@given(st_=schedule_and_t(max_T=10_000), seed=st.integers(0, 2**32 - 1))
def test_round_trips(st_, seed):
    s, t = st_
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    ab = abar_by_product(s.betas, t)
    if ab < 1e-200:
        return
    one_minus_ab = -math.expm1(float(np.sum(np.log1p(-s.betas[: t + 1]))))  # 1 - abar without cancellation
    xt = math.sqrt(ab) * x0 + math.sqrt(one_minus_ab) * eps
    # a few ulps of the inputs, amplified by 1/sqrt(abar) (x0 from x_t) or 1/sqrt(1 - abar) (eps from x_t)
    assert_allclose(P.x0_from_eps(s, xt, t, eps), x0, rtol=0, atol=1e-13 / math.sqrt(ab))
    assert_allclose(P.eps_from_x0(s, xt, t, x0), eps, rtol=0, atol=1e-13 / math.sqrt(one_minus_ab))
    v = P.v_from_x0_eps(s, t, x0, eps)
    assert_allclose(v, math.sqrt(ab) * eps - math.sqrt(one_minus_ab) * x0, rtol=0, atol=1e-14)
    assert_allclose(P.x0_from_v(s, xt, t, v), x0, rtol=0, atol=1e-13)
    assert_allclose(P.eps_from_v(s, xt, t, v), eps, rtol=0, atol=1e-13)
    score = P.score_from_eps(s, t, eps)
    assert_allclose(P.eps_from_score(s, t, score), eps, rtol=1e-12)


@given(st_=schedule_and_t(max_T=5000), seed=st.integers(0, 2**32 - 1))
def test_score_is_gradient_of_log_q(st_, seed):
    # score_from_eps = grad_{x_t} log N(x_t; sqrt(abar) x0, (1 - abar) I), by torch autograd.
    s, t = st_
    ab = abar_by_product(s.betas, t)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    logq = torch.distributions.Normal(math.sqrt(ab) * x0, math.sqrt(1 - ab)).log_prob(xt).sum()
    (grad,) = torch.autograd.grad(logq, xt)
    eps = (xt.detach() - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    ours = P.score_from_eps(s, torch.full((3,), t), eps)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, grad, rtol=1e-10, atol=1e-10)


def test_per_sample_t_broadcasts_over_trailing_dims():
    s = dm.cosine_schedule(100)
    xt, eps = np.ones((3, 2, 4, 4)), np.zeros((3, 2, 4, 4))
    t = np.array([0, 50, 99])
    out = P.x0_from_eps(s, xt, t, eps)
    for i, ti in enumerate(t):
        assert_allclose(out[i], 1 / math.sqrt(abar_by_product(s.betas, ti)), rtol=1e-12)


def test_zero_terminal_snr_v_gives_x0():
    # eps cannot give x0 at abar = 0 (refused: BAD_INPUT), v can
    s = dm.rescale_zero_terminal_snr(dm.linear_schedule(100))
    xt = np.ones((2, 3))
    t = np.array([5, 99])
    # v-prediction is well defined there: x0 = sqrt(abar) x_t - sqrt(1 - abar) v = -v
    v = np.full((2, 3), 0.25)
    out = P.x0_from_v(s, xt, t, v)
    assert np.all(np.isfinite(out)) and np.allclose(out[1], -0.25)
    # eps_from_x0 at abar = 0 is x_t itself, not inf/inf
    assert np.allclose(P.eps_from_x0(s, xt, t, np.zeros((2, 3)))[1], 1.0)


# ----------------------------------------------------------------------------- float32 beyond range
def _mp_abar(betas, t):
    import mpmath as mp

    p = mp.mpf(1)
    for b in betas[: t + 1].tolist():
        p *= 1 - mp.mpf(b)
    return p


def _as_float32(v):
    """An mpmath value rounded to float32 (+-inf beyond its range), as float64."""
    with np.errstate(over="ignore"):
        return float(np.float32(float(v)))


def _close32(out, ref):
    """out (float32 values as float64) equals ref rounded to float32, to a few float32 ulps
    (the float64 computation rounds once at the end); infinities must match in sign."""
    ref32 = np.array([_as_float32(r) for r in ref])
    inf = np.isinf(ref32)
    assert not np.isnan(out).any()
    assert np.array_equal(out[inf], ref32[inf])
    assert_allclose(out[~inf], ref32[~inf], rtol=4 * 2.0**-23, atol=1e-44)


def test_float32_x0_from_eps_where_one_over_sqrt_abar_overflows():
    # 60 steps of beta = 0.999: abar_t = 1e-3(t+1), below 1e-77 from t = 25 on, where float32
    # 1/sqrt(abar) and sqrt(1/abar - 1) are inf and x0 = inf x_t - inf eps was NaN.
    import mpmath as mp

    s = dm.Schedule.from_betas(np.full(60, 0.999))
    x = np.array([1.0, -1.0, 0.5, 1e-30, 3e-39, 0.0], np.float32)
    e = np.array([0.5, -2.0, 0.5, 0.0, 0.0, 0.0], np.float32)
    for t in (24, 25, 30, 59):
        with mp.workdps(40):
            ab = _mp_abar(s.betas, t)
            x0 = [(mp.mpf(float(a)) - mp.sqrt(1 - ab) * mp.mpf(float(b))) / mp.sqrt(ab) for a, b in zip(x, e)]
            eps_back = [(mp.mpf(float(a)) - mp.sqrt(ab) * mp.mpf(float(b))) / mp.sqrt(1 - ab) for a, b in zip(x, e)]
        xb, eb = np.tile(x, (2, 1)), np.tile(e, (2, 1))
        for xx, ee, tt in ((xb, eb, t), (torch.tensor(xb), torch.tensor(eb), torch.tensor([t, t]))):
            out = P.x0_from_eps(s, xx, tt, ee)
            assert out.dtype in (np.float32, torch.float32)
            out = np.asarray(out, dtype=np.float64)
            _close32(out[0], x0)
            _close32(out[1], x0)
            # eps_from_x0 with x0 = eps's slot: (x_t - sqrt(abar) eps) / sqrt(1 - abar), was inf/inf = NaN
            _close32(np.asarray(P.eps_from_x0(s, xx, tt, ee), dtype=np.float64)[0], eps_back)
    # a call whose every t fits float32 keeps the float32 arithmetic, bit for bit; a batch that
    # mixes in a tiny abar is computed in float64 as a whole and rounded once
    ordinary = P.x0_from_eps(s, x[None], 3, e[None])[0]
    c1, c2 = np.float32(s.sqrt_recip_alphas_cumprod[3]), np.float32(s.sqrt_recipm1_alphas_cumprod[3])
    assert np.array_equal(ordinary, c1 * x - c2 * e)
    mixed = P.x0_from_eps(s, np.stack([x, x]), np.array([3, 59]), np.stack([e, e]))
    wide = P.x0_from_eps(s, np.stack([x, x]).astype(np.float64), np.array([3, 59]), np.stack([e, e]).astype(np.float64))
    with np.errstate(over="ignore"):
        assert np.array_equal(mixed, wide.astype(np.float32))


def test_float32_score_from_eps_where_sqrt_one_minus_abar_underflows():
    # betas of 1e-95: sqrt(1 - abar) = 7e-48 rounds to 0 in float32, and -0/0 was NaN
    import mpmath as mp

    s = dm.Schedule.from_betas(np.full(4, 1e-95))
    e = np.array([[1.0, 0.0, 1e-40, -2e-45]], np.float32)
    with mp.workdps(300):  # enough digits that 1 - 1e-95 is not 1
        sd = mp.sqrt(1 - _mp_abar(s.betas, 2))
        ref = [-mp.mpf(float(v)) / sd for v in e[0]]
    for ee in (e, torch.tensor(e)):
        out = np.asarray(P.score_from_eps(s, 2, ee), dtype=np.float64)[0]
        _close32(out, ref)


# ----------------------------------------------------------------------------- bad input
BAD_INPUT = [
    # at zero terminal SNR eps cannot give x0
    (
        P.x0_from_eps,
        dict(
            s=dm.rescale_zero_terminal_snr(dm.linear_schedule(100)),
            x_t=np.ones((2, 3)),
            t=np.array([5, 99]),
            eps=np.zeros((2, 3)),
        ),
        ValueError,
        "undefined at t = 99, where alphas_cumprod = 0",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
