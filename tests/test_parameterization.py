"""eps <-> x0 <-> v <-> score conversions, against x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
built in the test, and the score against torch autograd of the closed-form log-density."""

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import diffmath as dm
from diffmath import parameterization as P

from _ref import abar_by_product, schedule_and_t


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


def test_zero_terminal_snr_eps_cannot_give_x0_but_v_can():
    s = dm.rescale_zero_terminal_snr(dm.linear_schedule(100))
    xt, eps = np.ones((2, 3)), np.zeros((2, 3))
    t = np.array([5, 99])
    with np.testing.assert_raises_regex(ValueError, "undefined at t = 99, where alphas_cumprod = 0"):
        P.x0_from_eps(s, xt, t, eps)
    # v-prediction is well defined there: x0 = sqrt(abar) x_t - sqrt(1 - abar) v = -v
    v = np.full((2, 3), 0.25)
    out = P.x0_from_v(s, xt, t, v)
    assert np.all(np.isfinite(out)) and np.allclose(out[1], -0.25)
    # eps_from_x0 at abar = 0 is x_t itself, not inf/inf
    assert np.allclose(P.eps_from_x0(s, xt, t, np.zeros((2, 3)))[1], 1.0)
