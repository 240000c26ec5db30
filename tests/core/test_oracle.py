"""diffmath.oracle against scipy (densities, finite-difference scores, quadrature), Monte Carlo
with stated tests and seeds, and the real samplers: the exact sampler-output distributions must
match Monte Carlo runs of sample_ddim / sample_ddpm / sample_sde / sample_pc / sample_ode_heun."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy import stats
from scipy.integrate import dblquad, quad
from scipy.special import logsumexp

from diffmath.forward import q_sample
from diffmath.oracle import GaussianData, GaussianMixture, expected_norm
from diffmath.samplers import sample_ddim, sample_ddpm, sample_ode, sample_ode_heun, sample_pc, sample_sde
from diffmath.schedules import cosine_schedule, linear_schedule, named_schedule
from diffmath.sde import VESDE, VPSDE, SubVPSDE
from tests.reference._ref import abar_by_product

MU = np.array([0.5, -0.3])
COV = np.array([[0.04, 0.01], [0.01, 0.02]])
DATA = GaussianData(MU, COV)
MIX = GaussianMixture([0.3, 0.7], [[-1.0], [0.8]], [[[0.05]], [[0.2]]])
S = linear_schedule(1000)


def _coefs(s_or_sde, t):
    """(a, s) of the forward kernel q(x_t | x0) = N(a x0, s^2 I), derived by hand (not read
    from the library), used to build the scipy references here. Schedules: abar_t by a plain
    product of the betas. SDEs (Song et al. 2021, eq. 29, in 40-digit mpmath): log a =
    -t^2 (beta_max - beta_min)/4 - t beta_min/2 with s^2 = 1 - a^2 (VP) or s = 1 - a^2
    (sub-VP); VE a = 1, s^2 = sigma(t)^2 - sigma_min^2 (the exact kernel from x0)."""
    if isinstance(s_or_sde, (VPSDE, VESDE)):
        mp.mp.dps = 40
        tt = mp.mpf(t)
        if isinstance(s_or_sde, VESDE):
            smin, smax = mp.mpf(s_or_sde.sigma_min), mp.mpf(s_or_sde.sigma_max)
            return 1.0, float(smin * mp.sqrt((smax / smin) ** (2 * tt) - 1))
        b0, b1 = mp.mpf(s_or_sde.beta_min), mp.mpf(s_or_sde.beta_max)
        a = mp.exp(-(tt**2) * (b1 - b0) / 4 - tt * b0 / 2)
        s = 1 - a**2 if isinstance(s_or_sde, SubVPSDE) else mp.sqrt(1 - a**2)
        return float(a), float(s)
    abar = abar_by_product(s_or_sde.betas, t)
    return math.sqrt(abar), math.sqrt(1 - abar)


PROCS = [(S, 0), (S, 500), (S, 999), (cosine_schedule(50), 25), (VPSDE(), 1e-3), (SubVPSDE(), 0.5), (VESDE(), 0.3)]


def _mix_logpdf(x, a, s):
    comps = [
        math.log(w) + stats.norm(a * m[0], math.sqrt(a * a * c[0, 0] + s * s)).logpdf(x)
        for w, m, c in zip(MIX.weights, MIX.means, MIX.covs)
    ]
    return logsumexp(np.stack(comps), axis=0)


@pytest.mark.parametrize("proc, t", PROCS)
def test_scores_are_gradients_of_the_scipy_marginal(proc, t):
    a, s = _coefs(proc, t)
    ref = stats.multivariate_normal(a * MU, a * a * COV + s * s * np.eye(2))
    x = np.random.default_rng(0).normal(size=(5, 2)) * 0.5
    h = 1e-5
    grad = np.stack([(ref.logpdf(x + h * e) - ref.logpdf(x - h * e)) / (2 * h) for e in np.eye(2)], 1)
    assert_allclose(DATA.score(x, t, proc), grad, rtol=1e-6, atol=1e-8)
    assert_allclose(DATA.marginal(proc, t).log_prob(x), ref.logpdf(x), rtol=1e-12)
    if isinstance(proc, type(S)):
        assert_allclose(DATA.eps(x, t, proc), -s * grad, rtol=1e-6, atol=1e-8)
    x1 = np.linspace(-2, 2, 7)[:, None]
    g1 = (_mix_logpdf(x1[:, 0] + h, a, s) - _mix_logpdf(x1[:, 0] - h, a, s)) / (2 * h)
    assert_allclose(MIX.score(x1, t, proc)[:, 0], g1, rtol=1e-6, atol=1e-8)
    assert_allclose(MIX.marginal(proc, t).log_prob(x1), _mix_logpdf(x1[:, 0], a, s), rtol=1e-12)


def test_mixture_marginal_is_the_convolution():
    # q_t(x) = int p_0(x0) N(x; a x0, s^2) dx0, by scipy quad.
    t = 300
    a, s = _coefs(S, t)
    q = MIX.marginal(S, t)
    for x in (-1.5, 0.0, 0.7, 2.0):
        val, _ = quad(
            lambda x0: math.exp(MIX.log_prob(np.array([[x0]]))[0]) * stats.norm(a * x0, s).pdf(x),
            -8,
            8,
            epsabs=1e-13,
            epsrel=1e-11,
            limit=200,
        )
        assert_allclose(math.exp(q.log_prob(np.array([[x]]))[0]), val, rtol=1e-8)


def test_marginal_matches_forward_noising_ks():
    # x0 from the oracle, x_t from diffmath.forward.q_sample; KS test (seed 0, n = 20000,
    # p > 1e-3) of each coordinate against the oracle's marginal, and of the mixture.
    rng = np.random.default_rng(0)
    n, t = 20000, 400
    x0 = DATA.sample(n, rng)
    xt = q_sample(S, x0, t, rng.standard_normal(x0.shape))
    q = DATA.marginal(S, t)
    for i in range(2):
        assert stats.kstest(xt[:, i], "norm", args=(q.mean[i], math.sqrt(q.cov[i, i]))).pvalue > 1e-3
    xm = MIX.sample(n, rng)
    xmt = q_sample(S, xm, t, rng.standard_normal(xm.shape))
    qm = MIX.marginal(S, t)

    def cdf(v):
        return sum(w * stats.norm(m[0], math.sqrt(c[0, 0])).cdf(v) for w, m, c in zip(qm.weights, qm.means, qm.covs))

    assert stats.kstest(xmt[:, 0], cdf).pvalue > 1e-3
    assert (
        stats.kstest(
            xm[:, 0],
            lambda v: sum(
                w * stats.norm(m[0], math.sqrt(c[0, 0])).cdf(v) for w, m, c in zip(MIX.weights, MIX.means, MIX.covs)
            ),
        ).pvalue
        > 1e-3
    )


def test_exact_eps_is_the_conditional_mean_monte_carlo():
    # eps(x_t) = E[z | x_t] iff E[(z - eps(x_t)) h(x_t)] = 0 for all h; check h = 1, x, x^2
    # (n = 200000, seed 1, each |mean| < 5 SE) -- and that a 10% mis-scaled predictor fails.
    rng = np.random.default_rng(1)
    n, t = 200000, 300
    for data in (DATA, MIX):
        x0 = data.sample(n, rng)
        z = rng.standard_normal(x0.shape)
        xt = q_sample(S, x0, t, z)
        for scale, ok in ((1.0, True), (1.1, False)):
            r = z - scale * data.eps(xt, t, S)
            stats_ = []
            for h in (np.ones_like(xt), xt, xt**2):
                v = (r * h).reshape(-1)
                stats_.append(abs(v.mean()) / (v.std() / math.sqrt(v.size)))
            assert (max(stats_) < 5) == ok, stats_


def test_expected_norm_against_scipy():
    for mu, sd in ((0.0, 1.0), (0.7, 0.3), (-2.0, 0.5)):
        assert_allclose(expected_norm([mu], [[sd * sd]]), stats.foldnorm(abs(mu) / sd, scale=sd).mean(), rtol=1e-12)
    m, C = np.array([0.3, -0.2]), np.array([[0.5, 0.2], [0.2, 0.3]])
    pdf = stats.multivariate_normal(m, C).pdf
    ref, _ = dblquad(lambda y, x: math.hypot(x, y) * pdf([x, y]), -7, 7, -7, 7, epsabs=1e-12, epsrel=1e-10)
    assert_allclose(expected_norm(m, C), ref, rtol=1e-8)
    assert_allclose(expected_norm(np.zeros(3), np.eye(3)), stats.chi(3).mean(), rtol=1e-14)


# ----------------------------------------------------------------------------- exact outputs vs MC
def _mc_check(samples, exact, k=5.0):
    """Sample mean and covariance against the exact Gaussian: each mean coordinate within k SE
    (SE = sqrt(cov_ii / n)) and each covariance entry within k SE (SE = sqrt((C_ii C_jj + C_ij^2)/n),
    the Gaussian variance of the sample covariance)."""
    n = samples.shape[0]
    m, C = exact.mean, exact.cov
    se_m = np.sqrt(np.diag(C) / n)
    assert np.all(np.abs(samples.mean(0) - m) < k * se_m), (samples.mean(0), m)
    Ch = np.cov(samples.T)
    se_c = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / n)
    assert np.all(np.abs(Ch - C) < k * se_c), (Ch, C)


N_MC = 20000
DISCRETE_CASES = [
    ("ddim", dict(steps=10, eta=0.0, spacing="leading")),
    ("ddim", dict(steps=10, eta=0.5, spacing="trailing")),
    ("ddim", dict(steps=7, eta=1.0, spacing="linspace")),
    ("ddpm", dict(steps=20, spacing="leading", variance="large")),
    ("ddpm", dict(steps=None, variance="small")),
]


@pytest.mark.parametrize("sampler, kw", DISCRETE_CASES)
def test_exact_discrete_outputs_match_monte_carlo(sampler, kw):
    # Fixed seed 0, n = 20000 samples of the real loop driven by the exact eps; mean and
    # covariance compared with the oracle's exact output at 5 SE (10 statistics per case).
    s = linear_schedule(100) if kw.get("steps") is None else S
    exact = DATA.exact_output(s, sampler, **kw)

    def eps(x, t):
        return DATA.eps(x, t, s)

    g = np.random.default_rng(0)
    if sampler == "ddim":
        x = sample_ddim(eps, s, (N_MC, 2), generator=g, **kw)
    else:
        x = sample_ddpm(eps, s, (N_MC, 2), generator=g, **kw)
    _mc_check(x, exact)


SDE_CASES = [
    ("euler_maruyama", VPSDE(), 30),
    ("euler_maruyama", VESDE(), 30),
    ("predictor_corrector", VPSDE(), 30),
    ("predictor_corrector", SubVPSDE(), 15),
    ("probability_flow_heun", VESDE(), 20),
]


@pytest.mark.parametrize("sampler, sde, steps", SDE_CASES)
def test_exact_sde_outputs_match_monte_carlo(sampler, sde, steps):
    # As above (seed 0, n = 20000, 5 SE). The PC loop uses corrector_norm="batch", whose step
    # tends to the oracle's deterministic one as the batch grows (|error| ~ 1/sqrt(n)).
    exact = DATA.exact_sde_output(sde, sampler, steps)

    def score(x, t):
        return DATA.score(x, t, sde)

    g = np.random.default_rng(0)
    if sampler == "euler_maruyama":
        x = sample_sde(score, sde, (N_MC, 2), steps=steps, generator=g)
    elif sampler == "predictor_corrector":
        x = sample_pc(
            score, sde, (N_MC, 2), steps=steps, predictor="euler_maruyama", corrector_norm="batch", generator=g
        )
    else:
        x = sample_ode_heun(score, sde, (N_MC, 2), steps=steps, generator=g)
    _mc_check(x, exact)


def test_exact_probability_flow_is_the_solve_ivp_flow():
    for sde in (VPSDE(), VESDE()):
        X = np.vstack([np.zeros((1, 2)), np.eye(2)])
        out = sample_ode(lambda x, t: DATA.score(x, t, sde), sde, x_T=X, rtol=1e-11, atol=1e-11)
        k, M = out[0], (out[1:] - out[0]).T
        start = GaussianData([0.1, 0.2], np.diag([1.5, 0.5]) * sde.prior_std**2)
        ex = DATA.exact_sde_output(sde, "probability_flow", start=start)
        assert_allclose(M @ start.mean + k, ex.mean, rtol=0, atol=1e-7)
        assert_allclose(M @ start.cov @ M.T, ex.cov, rtol=1e-6, atol=1e-9)


def test_ddim_eta0_with_all_steps_converges_to_the_data():
    # Deterministic DDIM with every step of named_schedule("linear", T) (same curve for all T):
    # KL(output || data) decreases with T, at least like T^-1.5 at the end (~T^-2 asymptotically:
    # DDIM is a first-order ODE solver, so the output error is O(1/T) and the KL O(1/T^2)).
    Ts = [50, 100, 200, 400, 800]
    kls = [DATA.exact_output(named_schedule("linear", T), "ddim", T, eta=0.0).kl(DATA) for T in Ts]
    assert all(a > b for a, b in zip(kls, kls[1:])), kls
    assert math.log(kls[-2] / kls[-1]) / math.log(2) > 1.5, kls
    assert kls[-1] < 1e-3


def test_torch_inputs_and_autograd():
    x = np.random.default_rng(0).normal(size=(4, 2))
    t = np.array([0.1, 0.3, 0.6, 0.9])
    for data in (DATA, GaussianMixture([0.5, 0.5], [[0.0, 1.0], [1.0, -1.0]], [COV, 2 * COV])):
        ref = data.score(x, t, VPSDE())
        xt = torch.tensor(x, requires_grad=True)
        out = data.score(xt, torch.tensor(t), VPSDE())
        assert_allclose(out.detach().numpy(), ref, rtol=1e-13)
        out.sum().backward()
        assert xt.grad is not None and bool(torch.isfinite(xt.grad).all())
        assert data.eps(torch.tensor(x, dtype=torch.float32), 10, S).dtype == torch.float32
    smp = DATA.sample(5, torch.Generator().manual_seed(0))
    assert isinstance(smp, torch.Tensor) and smp.shape == (5, 2)


def test_bad_input():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianData([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match=r"cov must have shape \(2, 2\)"):
        GaussianData([0.0, 0.0], [[1.0]])
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]], [[[1.0]], [[1.0]]])
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\); got \(3, 3\)"):
        DATA.score(np.ones((3, 3)), 5, S)
    with pytest.raises(ValueError, match="sampler must be 'ddim' or 'ddpm'"):
        DATA.exact_output(S, "plms")
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 1000\]; got steps = 1001"):
        DATA.exact_output(S, "ddim", 1001)
    with pytest.raises(ValueError, match="sampler must be 'euler_maruyama'"):
        DATA.exact_sde_output(VPSDE(), "rk4")
    # the predictor-corrector settings are checked as sample_pc checks them
    with pytest.raises(ValueError, match=r"snr must be finite and > 0; got snr = -1.0"):
        DATA.exact_sde_output(VPSDE(), "predictor_corrector", 5, snr=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be finite and > 0; got alpha = 0.0"):
        DATA.exact_sde_output(VPSDE(), "predictor_corrector", 5, alpha=0.0)
    with pytest.raises(ValueError, match=r"n_corrector_steps must be an integer >= 0; got -1"):
        DATA.exact_sde_output(VPSDE(), "predictor_corrector", 5, n_corrector_steps=-1)
    with pytest.raises(ValueError, match=r"n_corrector_steps must be an integer >= 0; got 1.5"):
        DATA.exact_sde_output(VPSDE(), "predictor_corrector", 5, n_corrector_steps=1.5)
    # expected_norm validates its covariance instead of dividing by zero
    with pytest.raises(ValueError, match="cov must be positive definite"):
        expected_norm([0.0], [[0.0]])
    with pytest.raises(ValueError, match=r"cov must have shape \(2, 2\)"):
        expected_norm([0.0, 0.0], [[1.0]])
    with pytest.raises(ValueError, match="cov must be finite"):
        expected_norm([0.0], [[np.nan]])
    with pytest.raises(TypeError, match="start must be a GaussianData of dimension 2"):
        DATA.exact_output(S, start=GaussianData([0.0], [[1.0]]))
