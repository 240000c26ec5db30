"""ode_likelihood against scipy.stats.multivariate_normal.logpdf, and Hutchinson's estimator
checked for unbiasedness by a stated z-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy import stats

from diffmath.likelihood import ode_likelihood
from diffmath.oracle import GaussianData
from diffmath.sde import VESDE, VPSDE, SubVPSDE

COV = np.array([[0.5, 0.2, 0.0], [0.2, 0.3, -0.1], [0.0, -0.1, 0.4]])


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_exact_divergence_likelihood_of_centred_gaussian_data(sde):
    # The ODE gives log p_eps (the density at eps, not the data's) up to the prior mismatch
    # log N(z; prior) - log p_1(z), measured at 7.4e-5 (VP), 1.6e-4 (sub-VP), 2.0e-4 (VE) nats
    # here: 3e-4 with the SDE's own prior. With the exact p_1 as the prior the mismatch is gone
    # and what is left is the solver error (measured <= 7.7e-7 at rtol = atol = 1e-7): 2e-6,
    # which the VP row could not meet with eps ignored (log p_eps - log p_0 = 1.2e-5 there).
    data = GaussianData(np.zeros(3), COV)
    x = data.sample(6, np.random.default_rng(0))
    score = lambda y, t: data.score(y, t, sde)  # noqa: E731
    ref = data.marginal(sde, 1e-5).log_prob(x)
    lp, bpd = ode_likelihood(sde, score, x, eps=1e-5, rtol=1e-7, atol=1e-7)
    assert_allclose(lp, ref, rtol=0, atol=3e-4)
    assert_allclose(bpd, -lp / (3 * math.log(2)), rtol=1e-14)
    lp_exact, _ = ode_likelihood(
        sde, score, x, eps=1e-5, rtol=1e-7, atol=1e-7, prior_logp=data.marginal(sde, 1.0).log_prob
    )
    assert_allclose(lp_exact, ref, rtol=0, atol=2e-6)
    # and p_eps is the data density to O(eps): scipy's logpdf within 3e-4 + 1.2e-5
    assert_allclose(lp, stats.multivariate_normal(np.zeros(3), COV).logpdf(x), rtol=0, atol=4e-4)


def test_exact_prior_removes_the_mismatch_for_uncentred_data():
    # With the exact marginal p_1 as the prior the ODE gives log p_eps exactly (1e-6 at these
    # tolerances), and p_eps is within 1e-3 nats of the data density for eps = 1e-5.
    sde = VPSDE()
    mu = np.array([1.0, -2.0, 0.5])
    data = GaussianData(mu, COV)
    x = data.sample(5, np.random.default_rng(1))
    lp, _ = ode_likelihood(
        sde,
        lambda y, t: data.score(y, t, sde),
        x,
        eps=1e-5,
        rtol=1e-9,
        atol=1e-9,
        prior_logp=data.marginal(sde, 1.0).log_prob,
    )
    assert_allclose(lp, data.marginal(sde, 1e-5).log_prob(x), rtol=0, atol=1e-6)
    assert_allclose(lp, stats.multivariate_normal(mu, COV).logpdf(x), rtol=0, atol=1e-3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    # One x repeated 400 times, each copy with its own probe (fixed along the trajectory):
    # the estimates vary (the covariance is not diagonal), their mean is within 4 standard
    # errors of the exact-divergence value (seed 0).
    sde = VPSDE()
    data = GaussianData(np.zeros(3), COV)
    x0 = data.sample(1, np.random.default_rng(2))
    x = np.repeat(x0, 400, axis=0)

    def score(y, t):
        return data.score(y, t, sde)

    exact, _ = ode_likelihood(sde, score, x0, "exact", rtol=1e-7, atol=1e-7)
    est, _ = ode_likelihood(
        sde, score, x, "hutchinson", probe=probe, rtol=1e-7, atol=1e-7, generator=np.random.default_rng(0)
    )
    se = est.std(ddof=1) / math.sqrt(est.size)
    assert est.std() > 1e-3
    assert abs(est.mean() - exact[0]) < 4 * se, (est.mean(), exact[0], se)


def test_torch_input_and_errors():
    sde = VPSDE()
    data = GaussianData(np.zeros(2), COV[:2, :2])
    x = torch.tensor(data.sample(3, np.random.default_rng(0)), dtype=torch.float32)
    lp, bpd = ode_likelihood(sde, lambda y, t: data.score(y, t, sde), x, rtol=1e-6, atol=1e-6)
    assert isinstance(lp, torch.Tensor) and lp.shape == (3,)
    with pytest.raises(TypeError, match="must return a torch tensor"):
        ode_likelihood(sde, lambda y, t: data.score(y.detach().numpy(), t.numpy(), sde), x)
    with pytest.raises(ValueError, match="divergence must be 'exact' or 'hutchinson'; got 'trace'"):
        ode_likelihood(sde, lambda y, t: -y, x, "trace")
    with pytest.raises(ValueError, match=r"eps \(the stopping time\) must lie in \(0, 1.0\); got eps = 1.5"):
        ode_likelihood(sde, lambda y, t: -y, x, eps=1.5)


def test_non_finite_score_is_named():
    # a score_fn returning NaN is reported as such, not as a bad time t = nan
    with pytest.raises(ValueError, match=r"score_fn returned non-finite values.*t = 1e-05"):
        ode_likelihood(VPSDE(), lambda y, t: y * float("nan"), torch.zeros(2, 3, dtype=torch.float64), eps=1e-5)


def _gaussian_case():
    sde = VPSDE()
    data = GaussianData(np.zeros(3), COV)
    return sde, data, data.sample(4, np.random.default_rng(3))


def test_score_cut_off_from_x_is_refused_before_integrating():
    # A score computed in numpy and wrapped as a tensor (or under no_grad, or from x.detach())
    # has no autograd path to x: the divergence then sees only the linear drift and the answer is
    # confidently wrong (-12.06 nats where the exact value is -0.91). It must be refused, before
    # any integration step (counted by the calls).
    sde, data, x = _gaussian_case()
    calls = []

    def numpy_wrapped(y, t):
        calls.append(1)
        return torch.tensor(data.score(y.detach().cpu().numpy(), t.detach().cpu().numpy(), sde))

    def from_numpy(y, t):
        calls.append(1)
        return torch.from_numpy(data.score(y.detach().numpy(), t.detach().numpy(), sde))

    def under_no_grad(y, t):
        calls.append(1)
        with torch.no_grad():
            return data.score(y, t, sde)

    w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def detached_input_through_a_parameter(y, t):  # requires grad, but only through w
        calls.append(1)
        return w * data.score(y.detach(), t, sde)

    for fn in (numpy_wrapped, from_numpy, under_no_grad, detached_input_through_a_parameter):
        calls.clear()
        for div in ("exact", "hutchinson"):
            with pytest.raises(ValueError, match="score_fn's output (does not depend on|is not connected to) x"):
                ode_likelihood(sde, fn, x, div, generator=np.random.default_rng(0))
        assert len(calls) == 2  # one probe call per attempt, no integration
    # a differentiable score still works, and one constant in x is fine when written as one (0 * x)
    lp, _ = ode_likelihood(sde, lambda y, t: data.score(y, t, sde), x, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(lp))
    ode_likelihood(sde, lambda y, t: 0.0 * y, x)
    with pytest.raises(ValueError, match=r"score_fn must return the shape of x \(4, 3\); got \(4, 1\)"):
        ode_likelihood(sde, lambda y, t: y[:, :1], x)
