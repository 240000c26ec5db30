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
    # Centred data, the SDE's own prior: within 1e-3 nats of scipy's logpdf of the data.
    data = GaussianData(np.zeros(3), COV)
    x = data.sample(6, np.random.default_rng(0))
    lp, bpd = ode_likelihood(sde, lambda y, t: data.score(y, t, sde), x, eps=1e-5, rtol=1e-7, atol=1e-7)
    ref = stats.multivariate_normal(np.zeros(3), COV).logpdf(x)
    assert_allclose(lp, ref, rtol=0, atol=1e-3)
    assert_allclose(bpd, -lp / (3 * math.log(2)), rtol=1e-14)


def test_exact_prior_removes_the_mismatch_for_uncentred_data():
    # With the exact marginal p_1 as the prior the ODE gives log p_eps exactly (1e-6 at these
    # tolerances), and p_eps is within 1e-3 nats of the data density for eps = 1e-5.
    sde = VPSDE()
    mu = np.array([1.0, -2.0, 0.5])
    data = GaussianData(mu, COV)
    x = data.sample(5, np.random.default_rng(1))
    lp, _ = ode_likelihood(sde, lambda y, t: data.score(y, t, sde), x, eps=1e-5, rtol=1e-9, atol=1e-9,
                           prior_logp=data.marginal(sde, 1.0).log_prob)
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
    est, _ = ode_likelihood(sde, score, x, "hutchinson", probe=probe, rtol=1e-7, atol=1e-7,
                            generator=np.random.default_rng(0))
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
