"""Probability-flow ODE samplers: with the exact score the flow maps the prior onto the data
(mean and covariance within 1e-4, read off the real solver as an affine map), Heun's order 2,
and numpy/torch agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from diffmath.oracle import GaussianData
from diffmath.samplers import heun_step, sample_ode, sample_ode_heun
from diffmath.sde import VESDE, VPSDE, SubVPSDE
from tests._tables import refusals

MU = np.array([0.8, -0.5])
COV = np.array([[0.3, 0.1], [0.1, 0.2]])


def _affine_map(run, D):
    """The ODE sampler's map x_T -> x_eps is affine for Gaussian data: read (M, k) from it."""
    X = np.vstack([np.zeros((1, D)), np.eye(D)])
    out = run(X)
    k = out[0]
    return (out[1:] - k).T, k


@pytest.mark.parametrize(
    "sde, centred",
    [(VPSDE(), True), (SubVPSDE(), True), (VESDE(), True), (VPSDE(), False), (VESDE(), False)],
)
def test_probability_flow_maps_the_prior_onto_the_data(sde, centred):
    # Centred data: start from the prior N(0, prior_std^2 I) itself. Otherwise start from the
    # exact q_1 (the prior differs from q_1 in its mean by m(1) mu, ~7e-3 for VP).
    mu = np.zeros(2) if centred else MU
    data = GaussianData(mu, COV)
    eps = 1e-5

    def run(X):
        return sample_ode(lambda x, t: data.score(x, t, sde), sde, x_T=X, eps=eps, rtol=1e-10, atol=1e-10)

    M, k = _affine_map(run, 2)
    if centred:
        m0, c0 = np.zeros(2), sde.prior_std**2 * np.eye(2)
    else:
        q1 = data.marginal(sde, 1.0)
        m0, c0 = q1.mean, q1.cov
    assert_allclose(M @ m0 + k, mu, rtol=0, atol=1e-4)
    assert_allclose(M @ c0 @ M.T, COV, rtol=0, atol=1e-4)


def test_heun_is_second_order_towards_the_exact_flow():
    sde = VPSDE()
    data = GaussianData(MU, COV)
    q1 = data.marginal(sde, 1.0)
    target = data.marginal(sde, 1e-3)
    errs = []
    for n in (40, 80, 160):
        M, k = _affine_map(lambda X: sample_ode_heun(lambda x, t: data.score(x, t, sde), sde, x_T=X, steps=n), 2)
        errs.append(max(np.abs(M @ q1.cov @ M.T - target.cov).max(), np.abs(M @ q1.mean + k - target.mean).max()))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 1.8), (rates, errs)


def test_heun_torch_matches_numpy_and_ode_accepts_torch():
    sde = VESDE()
    data = GaussianData(MU, COV)
    X = np.random.default_rng(0).normal(size=(5, 2)) * 50

    def score(x, t):
        return data.score(x, t, sde)

    a = sample_ode_heun(score, sde, x_T=X, steps=30)
    b = sample_ode_heun(score, sde, x_T=torch.tensor(X), steps=30)
    assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
    assert_allclose(b.numpy(), a, rtol=1e-12, atol=1e-12)
    c = sample_ode(score, sde, x_T=X, rtol=1e-8, atol=1e-8)
    d = sample_ode(score, sde, x_T=torch.tensor(X, dtype=torch.float32), rtol=1e-8, atol=1e-8)
    assert d.dtype == torch.float32
    assert_allclose(d.double().numpy(), c, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
_VP = VPSDE()


def _minus_x(x, t):
    return -x


BAD_INPUT = [
    (
        sample_ode,
        dict(score_fn=_minus_x, sde=_VP, shape=(2, 2), rtol=0),
        ValueError,
        r"rtol must be a finite float > 0; got rtol = 0",
    ),
    (
        sample_ode_heun,
        dict(score_fn=_minus_x, sde=_VP, shape=(2, 2), steps=0),
        ValueError,
        r"steps must be >= 1; got steps = 0",
    ),
    (
        heun_step,
        dict(rsde=_VP.reverse(_minus_x), x=np.ones((2, 2)), t=0.5, dt=-0.1),
        TypeError,
        "probability_flow=True",
    ),
    (
        heun_step,
        dict(rsde=_VP.reverse(_minus_x, True), x=np.ones((2, 2)), t=0.5, dt=-0.5),
        ValueError,
        r"t must lie in \(0, 1\]",
    ),
    # a score_fn returning NaN is reported as such, not as a bad time t = nan
    (
        sample_ode,
        dict(score_fn=lambda x, t: x * np.nan, sde=_VP, shape=(2, 2), generator=np.random.default_rng(0)),
        ValueError,
        r"score_fn returned non-finite values.*t = 1.0",
    ),
    (
        sample_ode,
        dict(
            score_fn=lambda x, t: np.where(t[:, None] < 0.5, np.inf, -x),
            sde=_VP,
            shape=(2, 2),
            generator=np.random.default_rng(0),
        ),
        ValueError,
        r"score_fn returned non-finite values",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
