"""diffmath.sde against independent references: the moment ODEs solved by scipy, the DDPM and
SMLD chains built here from their papers' definitions, scipy.stats densities, and mpmath."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import stats
from scipy.integrate import solve_ivp

from diffmath.forward import q_step_sample
from diffmath.schedules import linear_schedule
from diffmath.sde import VESDE, VPSDE, SubVPSDE, eps_from_score, score_from_eps
from tests._tables import refusals

SETTINGS = settings(max_examples=15, deadline=None)


def _coef(sde, t):
    """a(t) and g(t) read from sde.sde(x, t) at x = 1 (the drift is linear in x)."""
    drift, g = sde.sde(np.ones((1, 1)), np.array([t]))
    return float(drift[0, 0]), float(np.asarray(g).reshape(-1)[0])


def _moments_by_ode(sde, t_end):
    """Solve dm/dt = a m, dv/dt = 2 a v + g^2 from (1, 0) with scipy (DOP853, tight tols)."""

    def rhs(t, y):
        a, g = _coef(sde, min(max(t, 0.0), 1.0))
        return [a * y[0], 2 * a * y[1] + g * g]

    sol = solve_ivp(rhs, (0.0, t_end), [1.0, 0.0], method="DOP853", rtol=1e-12, atol=1e-15)
    return sol.y[0, -1], sol.y[1, -1]


sde_strategy = st.one_of(
    st.builds(VPSDE, beta_min=st.floats(0.01, 1.0), beta_max=st.floats(5.0, 25.0)),
    st.builds(SubVPSDE, beta_min=st.floats(0.01, 1.0), beta_max=st.floats(5.0, 25.0)),
    st.builds(VESDE, sigma_min=st.floats(0.005, 0.1), sigma_max=st.floats(1.0, 80.0)),
)


@SETTINGS
@given(sde=sde_strategy, t=st.floats(1e-4, 1.0))
def test_marginals_solve_the_moment_odes(sde, t):
    # marginal_prob must be the solution of the moment ODEs of the SDE that sde() defines.
    m_ref, v_ref = _moments_by_ode(sde, t)
    mean, std = sde.marginal_prob(np.ones((1, 1)), t)
    assert_allclose(float(mean[0, 0]), m_ref, rtol=1e-10)
    assert_allclose(float(np.asarray(std)) ** 2, v_ref, rtol=1e-10)


@pytest.mark.parametrize("t", [0.0, 1e-7, 0.3, 1.0])
def test_drift_and_diffusion_match_the_papers_definitions(t):
    # Song et al. 2021, eq. 9, 11, 12 evaluated in 40-digit mpmath.
    mp.mp.dps = 40
    b0, b1 = mp.mpf("0.1"), mp.mpf(20)
    tt = mp.mpf(t)
    beta = b0 + tt * (b1 - b0)
    a, g = _coef(VPSDE(), t)
    assert_allclose(a, float(-beta / 2), rtol=1e-14)
    assert_allclose(g, float(mp.sqrt(beta)), rtol=1e-14)
    a, g = _coef(SubVPSDE(), t)
    integral = b0 * tt + (b1 - b0) * tt**2 / 2
    g_ref = mp.sqrt(beta * (1 - mp.exp(-2 * integral)))
    assert_allclose(a, float(-beta / 2), rtol=1e-14)
    if t > 0:
        assert_allclose(g, float(g_ref), rtol=1e-13)
    else:
        assert g == 0.0
    smin, smax = mp.mpf("0.01"), mp.mpf(50)
    a, g = _coef(VESDE(), t)
    assert a == 0.0
    assert_allclose(g, float(smin * (smax / smin) ** tt * mp.sqrt(2 * mp.log(smax / smin))), rtol=1e-14)


@pytest.mark.parametrize("t", [1e-9, 1e-6, 1e-3, 0.5])
def test_small_time_stds_have_full_relative_precision(t):
    # near t = 0 the naive 1 - exp(.) loses digits; compare with mpmath.
    mp.mp.dps = 50
    tt = mp.mpf(t)
    lmc = -(tt**2) * (mp.mpf(20) - mp.mpf("0.1")) / 4 - tt * mp.mpf("0.1") / 2
    assert_allclose(
        float(np.asarray(VPSDE().marginal_prob(np.ones(1), t)[1])), float(mp.sqrt(1 - mp.exp(2 * lmc))), rtol=1e-14
    )
    assert_allclose(
        float(np.asarray(SubVPSDE().marginal_prob(np.ones(1), t)[1])), float(1 - mp.exp(2 * lmc)), rtol=1e-14
    )
    s = mp.mpf("0.01") * (mp.mpf(5000) ** tt)
    ve = float(mp.sqrt(s**2 - mp.mpf("0.01") ** 2))
    assert_allclose(float(np.asarray(VESDE().marginal_prob(np.ones(1), t)[1])), ve, rtol=1e-13)


def test_linear_drift_coef_and_diffusion_coef_for_the_kernels():
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        t = np.array([0.0, 0.25, 1.0])
        a, g = sde.linear_drift_coef(t), sde.diffusion_coef(t)
        assert a.dtype == np.float64 and g.dtype == np.float64 and a.shape == (3,) and g.shape == (3,)
        x = np.random.default_rng(0).normal(size=(3, 4))
        drift, diff = sde.sde(x, t)
        # exact by construction: sde() and the coefficient accessors evaluate the same float64
        # expression of the same t (identical bits on any CPU), then one product
        assert_allclose(drift, a[:, None] * x, rtol=1e-15, atol=0)
        assert_allclose(np.asarray(diff).reshape(-1), g, rtol=1e-15)
        tt = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float32)
        at, gt = sde.linear_drift_coef(tt), sde.diffusion_coef(tt)
        assert isinstance(at, torch.Tensor) and at.dtype == torch.float64 and at.shape == (3,)
        assert_allclose(gt.numpy(), g, rtol=1e-7)
        assert np.ndim(sde.linear_drift_coef(0.5)) == 0 and np.ndim(sde.diffusion_coef(0.5)) == 0


@pytest.mark.parametrize("N", [20, 100, 1000, 4000])
def test_vp_discretize_is_the_ddpm_forward_step(N):
    # score_sde's VP chain: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z with
    # beta_i = linspace(beta_min/N, beta_max/N, N) -- i.e. DDPM's forward step q(x_i+1 | x_i)
    # of the linear schedule with those endpoints (for N = 1000, DDPM's own schedule).
    sde = VPSDE(N=N)
    s = linear_schedule(N, 0.1 / N, 20.0 / N)
    rng = np.random.default_rng(N)
    x, z = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    for i in (0, 1, N // 2, N - 1):
        f, G = sde.discretize(x, i / (N - 1))
        assert_allclose(x + f + G * z, q_step_sample(s, x, i, z), rtol=1e-13, atol=1e-15)


def test_vp_discretize_converges_to_the_sde_with_order_one():
    # The N-step DDPM chain of discretize() approaches the SDE as N grows. Local (one step of
    # length 1/N): mean coefficient sqrt(1 - beta_i) vs the exact exp(-int beta / 2) differ by
    # O(1/N^2). Global (the marginal at t = 1 after all N steps): O(1/N) -- first order.
    # Reference: the SDE's mean coefficient from the moment ODE (scipy), not marginal_prob.
    m1, v1 = _moments_by_ode(VPSDE(), 1.0)
    errs_global, errs_local = [], []
    for N in (250, 500, 1000, 2000, 4000):
        sde = VPSDE(N=N)
        x = np.ones((N, 1))
        t = np.arange(N) / (N - 1)
        f, G = sde.discretize(x, t)
        log_coef = np.log1p(f[:, 0])  # log sqrt(1 - beta_i)
        errs_global.append(abs(math.exp(log_coef.sum()) - m1))
        # one step from t = 0.5 over dt = 1/N vs the exact kernel from the moment ODE
        i = (N - 1) // 2
        t0 = i / (N - 1)

        def rhs(tt, y):
            return [-0.5 * (0.1 + tt * 19.9) * y[0]]

        m_step = solve_ivp(rhs, (t0, t0 + 1.0 / N), [1.0], method="DOP853", rtol=1e-13, atol=1e-16).y[0, -1]
        errs_local.append(abs((1.0 + f[i, 0]) - m_step))
    slope_g = np.polyfit(np.log([250, 500, 1000, 2000, 4000]), np.log(errs_global), 1)[0]
    slope_l = np.polyfit(np.log([250, 500, 1000, 2000, 4000]), np.log(errs_local), 1)[0]
    assert -1.1 < slope_g < -0.9, slope_g
    assert -2.1 < slope_l < -1.9, slope_l


def test_ve_discretize_is_the_smld_chain():
    # SMLD: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma from a geometric ladder.
    N = 1000
    sde = VESDE(N=N)
    sig = np.geomspace(0.01, 50.0, N)
    x = np.ones((N, 1))
    f, G = sde.discretize(x, np.arange(N) / (N - 1))
    ref = np.sqrt(sig**2 - np.concatenate([[0.0], sig[:-1]]) ** 2)
    assert np.all(f == 0)
    assert_allclose(G.reshape(-1), ref, rtol=1e-12)


def test_subvp_discretize_is_euler_maruyama_of_size_one_over_n():
    # The Euler-Maruyama step of size 1/N of the sub-VP SDE (Song et al. 2021, eq. 12), derived
    # by hand in 40-digit mpmath: f = -beta(t)/(2N) x, G = sqrt(beta(t) (1 - exp(-2 B(t))) / N),
    # beta(t) = beta_min + t (beta_max - beta_min), B(t) = int_0^t beta.
    mp.mp.dps = 40
    N = 500
    b0, b1 = mp.mpf("0.1"), mp.mpf(20)
    x = np.random.default_rng(1).normal(size=(5, 2))
    t = np.array([0.0, 1e-6, 0.1, 0.4, 1.0])
    f, G = SubVPSDE(N=N).discretize(x, t)
    for k, tk in enumerate(t.tolist()):
        tt = mp.mpf(tk)
        beta, B = b0 + tt * (b1 - b0), b0 * tt + (b1 - b0) * tt**2 / 2
        assert_allclose(f[k], float(-beta / (2 * N)) * x[k], rtol=1e-14, atol=0)
        assert_allclose(float(G[k, 0]), float(mp.sqrt(beta * -mp.expm1(-2 * B) / N)), rtol=1e-13, atol=0)


def test_subvp_discretize_converges_to_the_marginal_with_order_one():
    # The chain x_{i+1} = x_i + f(x_i, i/N) + G z over i = 0..N-1 carries mean coefficient and
    # variance by m <- (1 + f/x) m, v <- (1 + f/x)^2 v + G^2. At t = 1 they must approach the
    # sub-VP marginal derived by hand (Song et al. 2021, eq. 29): m = exp(-(beta_max -
    # beta_min)/4 - beta_min/2), v = (1 - m^2)^2, with error ~ C/N (weak order 1).
    m1 = math.exp(-(20.0 - 0.1) / 4 - 0.1 / 2)
    v1 = (1 - m1**2) ** 2
    Ns = (250, 500, 1000, 2000)
    err_m, err_v = [], []
    for N in Ns:
        f, G = SubVPSDE(N=N).discretize(np.ones((N, 1)), np.arange(N) / N)
        m, v = 1.0, 0.0
        for c, g in zip((1.0 + f[:, 0]).tolist(), G.reshape(-1).tolist()):
            m, v = c * m, c * c * v + g * g
        err_m.append(abs(m - m1))
        err_v.append(abs(v - v1))
    for errs in (err_m, err_v):
        slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
        assert -1.1 < slope < -0.9, (slope, errs)


def test_prior_logp_and_sampling_against_scipy():
    rng = np.random.default_rng(3)
    for sde, sd in ((VPSDE(), 1.0), (SubVPSDE(), 1.0), (VESDE(), 50.0)):
        z = sde.prior_sampling((4000, 3), np.random.default_rng(7))
        assert stats.kstest(z.reshape(-1) / sd, "norm").pvalue > 1e-3
        zz = rng.normal(size=(5, 2, 3)) * sd
        ref = stats.norm(0, sd).logpdf(zz).reshape(5, -1).sum(1)
        assert_allclose(sde.prior_logp(zz), ref, rtol=1e-13)
        zt = sde.prior_sampling((3, 2), torch.Generator().manual_seed(0))
        assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
        assert_allclose(
            sde.prior_logp(zt.double()).numpy(), stats.norm(0, sd).logpdf(zt.double().numpy()).sum(1), rtol=1e-12
        )


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_reverse_drift_transports_the_gaussian_marginals(sde):
    # 1-D data N(mu, s0^2): q_t = N(m mu, v), v = m^2 s0^2 + s^2. A linear flow dx = F dt
    # carries the variance as dv/dt = 2 (dF/dx) v (probability flow), and the reverse SDE
    # (run backward with diffusion g) as dv/dt = 2 (dF/dx) v - g^2 (Anderson 1982). dv/dt is
    # taken by a central difference of the closed-form v(t) built here.
    mu, s0 = 0.7, 0.3

    def var(t):
        m, s = sde.marginal_prob(np.ones(1), t)
        return float(m[0]) ** 2 * s0**2 + float(np.asarray(s)) ** 2, float(m[0])

    def score(x, t):
        v, m = var(float(t[0]))
        return -(x - m * mu) / v

    for t in (0.05, 0.4, 0.9):
        h = 1e-6
        dv = (var(t + h)[0] - var(t - h)[0]) / (2 * h)
        v = var(t)[0]
        xs = np.array([[0.0], [1.0]])
        for pf in (True, False):
            drift, g = sde.reverse(score, probability_flow=pf).sde(xs, t)
            slope = float(drift[1, 0] - drift[0, 0])
            g = float(np.asarray(g).reshape(-1)[0])
            assert (g == 0.0) == pf
            assert_allclose(2 * slope * v - g * g, dv, rtol=1e-6)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_score_eps_conversions_against_the_conditional_mean(sde):
    # For x0 ~ N(mu, s0^2) and x_t = m x0 + s z, the pair (z, x_t) is jointly Gaussian:
    # E[z | x_t] = s (x_t - m mu) / (m^2 s0^2 + s^2) and score = -(x_t - m mu) / (m^2 s0^2 + s^2).
    mu, s0 = -0.4, 0.8
    t = np.array([0.01, 0.3, 1.0])
    x = np.array([[0.3], [-1.0], [2.0]])
    # m and s from the closed forms (Song et al. 2021, eq. 29, 33 and App. B), not marginal_prob
    if isinstance(sde, VESDE):
        smin, smax = sde.sigma_min, sde.sigma_max
        m = np.ones_like(t)
        s = np.sqrt(smin**2 * ((smax / smin) ** (2 * t) - 1))
    else:
        bmin, bmax = sde.beta_min, sde.beta_max
        lin = -0.5 * t**2 * (bmax - bmin) - t * bmin  # log m(t)^2
        m = np.exp(0.5 * lin)
        one_minus = -np.expm1(lin)  # 1 - exp(lin), without cancellation at small t
        s = one_minus if isinstance(sde, SubVPSDE) else np.sqrt(one_minus)
    v = m**2 * s0**2 + s**2
    cond_eps = (s * (x[:, 0] - m * mu) / v)[:, None]
    ref_score = (-(x[:, 0] - m * mu) / v)[:, None]
    assert_allclose(score_from_eps(sde, t, cond_eps), ref_score, rtol=1e-13)
    assert_allclose(eps_from_score(sde, t, ref_score), cond_eps, rtol=1e-13)
    out = score_from_eps(sde, torch.tensor(t, dtype=torch.float32), torch.tensor(cond_eps, dtype=torch.float32))
    assert out.dtype == torch.float32
    assert_allclose(out.numpy(), ref_score, rtol=1e-5)


def test_torch_and_numpy_agree_and_keep_dtype():
    sde = VPSDE()
    x = np.random.default_rng(0).normal(size=(3, 2, 2))
    t = np.array([0.2, 0.5, 0.9])
    for meth in ("sde", "marginal_prob", "discretize"):
        a = getattr(sde, meth)(x, t)
        b = getattr(sde, meth)(torch.tensor(x), torch.tensor(t))
        c = getattr(sde, meth)(torch.tensor(x, dtype=torch.float16), torch.tensor(t))
        assert b[0].dtype == torch.float64 and c[0].dtype == torch.float16
        assert_allclose(b[0].numpy(), a[0], rtol=1e-14)
        assert_allclose(
            np.broadcast_to(b[1].numpy(), np.broadcast_shapes(b[1].shape, (3, 1, 1))),
            np.broadcast_to(a[1], np.broadcast_shapes(a[1].shape, (3, 1, 1))),
            rtol=1e-14,
        )


# ----------------------------------------------------------------------------- bad input
_VP, _X = VPSDE(), np.ones((2, 3))

BAD_INPUT = [
    # time outside the domain
    (_VP.sde, dict(x=_X, t=1.5), ValueError, r"t must lie in \[0, 1\].*1\.5"),
    (_VP.marginal_prob, dict(x0=_X, t=np.array([0.5, -0.1])), ValueError, r"t must lie in \[0, 1\].*-0\.1"),
    (score_from_eps, dict(sde=_VP, t=0.0, eps=_X), ValueError, r"t must lie in \(0, 1\].*t = 0\.0"),
    (_VP.reverse(lambda y, t: -y).sde, dict(x=_X, t=0.0), ValueError, r"t must lie in \(0, 1\]"),
    (_VP.sde, dict(x=_X, t=float("nan")), ValueError, "nan"),
    (_VP.sde, dict(x=_X, t=np.array([0.1, 0.2, 0.3])), ValueError, "batch of 3 times"),
    (_VP.sde, dict(x=_X, t=np.array([0, 1])), TypeError, "floating-point SDE time"),
    (_VP.sde, dict(x=np.ones((2, 3), dtype=np.int64), t=0.5), TypeError, "floating-point"),
    # constructor arguments
    (VPSDE, dict(beta_min=-1.0), ValueError, "beta_min"),
    (VPSDE, dict(beta_min=5.0, beta_max=1.0), ValueError, "beta_max"),
    (VESDE, dict(sigma_min=2.0, sigma_max=1.0), ValueError, "sigma_min < sigma_max"),
    (SubVPSDE, dict(N=0), ValueError, "N must be >= 1"),
    (VPSDE(N=10).discretize, dict(x=np.ones((1, 1)), t=0.5), ValueError, r"beta_max / N <= 1.*N = 10"),
    # a score of the wrong shape names both shapes
    (
        VESDE().reverse(lambda y, t: y[:, :1]).sde,
        dict(x=np.ones((2, 3)), t=0.5),
        ValueError,
        r"score_fn returned shape \(2, 1\) but x has shape \(2, 3\)",
    ),
    (VESDE().reverse(lambda y, t: torch.as_tensor(y)).sde, dict(x=np.ones((2, 3)), t=0.5), TypeError, "numpy array"),
    # an integer dtype gave zeros; a torch dtype with a numpy generator failed inside numpy
    (
        _VP.prior_sampling,
        dict(shape=(2,), generator=np.random.default_rng(0), dtype=np.int64),
        TypeError,
        "dtype must be a floating numpy dtype",
    ),
    (
        _VP.prior_sampling,
        dict(shape=(2,), generator=np.random.default_rng(0), dtype=torch.float32),
        TypeError,
        "dtype must be a floating numpy dtype",
    ),
    (
        _VP.prior_sampling,
        dict(shape=(2,), generator=torch.Generator().manual_seed(0), dtype=torch.int64),
        TypeError,
        "dtype must be a floating torch dtype",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
