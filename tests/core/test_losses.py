"""Losses: the VLB derivations of DDPM checked as identities, and the bound itself."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import stats

import diffmath as dm
from diffmath.gaussian import normal_kl
from diffmath.losses import (
    dsm_loss,
    fixed_log_variance,
    learned_range_log_variance,
    prior_bpd,
    simple_loss,
    snr_weight,
    vb_terms_bpd,
    vlb_weight,
)
from diffmath.parameterization import v_from_x0_eps, x0_from_eps, x0_from_v
from diffmath.posterior import posterior_mean_from_eps, q_posterior_mean_variance
from tests._tables import refusals
from tests.reference._ref import abar_by_product, linspace_betas, schedules


@given(s=schedules(max_T=5000, hi_max=0.5), data=st.data(), variance=st.sampled_from(["small", "large"]))
def test_eps_form_of_kl_is_weighted_mse(s, data, variance):
    # DDPM eq. 8-12: with a fixed model variance sigma^2 and mu_theta written through eps_theta,
    # KL(q(x_{t-1}|x_t,x0) || N(mu_theta, sigma^2)) - KL at eps_theta = eps  =  lambda_t (eps - eps_theta)^2.
    T = s.num_timesteps
    if T < 2:
        return
    t = data.draw(st.integers(1, T - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x0, eps, eps_th = rng.standard_normal((3, 2, 5))
    ab = abar_by_product(s.betas, t)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    true_mean, _, true_logv = q_posterior_mean_variance(s, x0, xt, t)
    model_mean = posterior_mean_from_eps(s, xt, t, eps_th)
    logv = s.posterior_log_variance_clipped[t] if variance == "small" else math.log(s.betas[t])
    kl = normal_kl(true_mean, true_logv, model_mean, logv) - normal_kl(true_mean, true_logv, true_mean, logv)
    lam = vlb_weight(s, t, variance)
    assert_allclose(kl, lam * (eps - eps_th) ** 2, rtol=1e-7, atol=1e-12 * (1 + lam))


@given(betas=linspace_betas(T=(2, 400)), variance=st.sampled_from(["small", "large"]))
def test_fixed_log_variance_against_mpmath(betas, variance):
    # 50-digit reference from the betas alone: log beta_tilde_t = log(beta_t (1 - abar_{t-1}) / (1 - abar_t))
    # ("small"), log beta_t ("large"); at t = 0 both are log beta_tilde_1 (guided-diffusion's fixed variances).
    s = dm.Schedule.from_betas(betas)
    T = s.num_timesteps
    with mp.workdps(50):
        b = [mp.mpf(float(v)) for v in betas]
        abar, prod = [], mp.mpf(1)
        for v in b:
            prod *= 1 - v
            abar.append(prod)
        tilde = lambda i: mp.log(b[i] * (1 - abar[i - 1]) / (1 - abar[i]))  # noqa: E731
        ref = [tilde(1)] + [tilde(i) if variance == "small" else mp.log(b[i]) for i in range(1, T)]
        ref = np.array([float(r) for r in ref])
    ours = fixed_log_variance(s, np.arange(T), variance)
    assert ours.dtype == np.float64 and ours.shape == (T,)
    assert_allclose(ours, ref, rtol=1e-13, atol=1e-13)
    tt = torch.tensor([0, T - 1])
    assert torch.equal(fixed_log_variance(s, tt, variance), torch.tensor(ours[[0, T - 1]]))


def test_vlb_weight_at_t0_against_mpmath():
    # DDPM eq. 12 at t = 0 with sigma^2 the clipped posterior variance beta_tilde_1 (both
    # variances): beta_0^2 / (2 beta_tilde_1 alpha_0 (1 - abar_0)), 50 digits from the betas
    betas = np.linspace(1e-4, 0.02, 50)
    s = dm.Schedule.from_betas(betas)
    with mp.workdps(50):
        b0, b1 = mp.mpf(float(betas[0])), mp.mpf(float(betas[1]))
        ab0, ab1 = 1 - b0, (1 - b0) * (1 - b1)
        tilde1 = b1 * (1 - ab0) / (1 - ab1)
        ref = float(b0**2 / (2 * tilde1 * (1 - b0) * (1 - ab0)))
    for variance in ("small", "large"):
        assert_allclose(vlb_weight(s, 0, variance), ref, rtol=1e-13)


def test_vlb_weight_shapes_and_t0():
    s = dm.linear_schedule(100)
    w = vlb_weight(s, np.array([0, 1, 99]))
    assert w.shape == (3,) and w.dtype == np.float64
    # at t = 0 both variances are the clipped posterior variance[1]
    assert vlb_weight(s, 0, "small") == vlb_weight(s, 0, "large")
    wt = vlb_weight(s, torch.tensor([0, 5]))
    assert isinstance(wt, torch.Tensor)


def _chain_moments(s, m, v):
    """Mean/variance of every latent under q for 1-D data N(m, v): index -1 is the data."""
    T = s.num_timesteps
    M, V = [m], [v]
    for t in range(T):
        a = 1 - s.betas[t]
        M.append(math.sqrt(a) * M[-1])
        V.append(a * V[-1] + s.betas[t])
    return M, V  # M[j + 1] is latent index j


def _vlb_and_nll(s, m, v, A, C, S2, prior=(0.0, 1.0)):
    """E_q[VLB] (nats) for the reverse model p(z_{t-1}|z_t) = N(A_t z_t + C_t, S2_t) (t >= 1),
    decoder p(x0|z_0) = N(A_0 z_0 + C_0, S2_0), prior N(prior) -- in closed form, with the
    posterior coefficients and normal_kl from the library; and the exact NLL E[-log p(x0)]."""
    T = s.num_timesteps
    ones = np.ones(1)
    total = 0.0
    # L_T: E_x0 KL(q(z_{T-1}|x0) || prior) = normal_kl at the rms mean difference
    ab = s.alphas_cumprod[T - 1]
    rms = math.sqrt(ab * v + (math.sqrt(ab) * m - prior[0]) ** 2)
    total += float(normal_kl(rms, math.log(1 - ab), 0.0, math.log(prior[1])))
    for t in range(1, T):
        c1 = float(q_posterior_mean_variance(s, ones, 0 * ones, t)[0][0])
        c2 = float(q_posterior_mean_variance(s, 0 * ones, ones, t)[0][0])
        pv = float(q_posterior_mean_variance(s, ones, ones, t)[1][0])
        ab = s.alphas_cumprod[t]
        # residual = c1 x0 + (c2 - A) z_t - C, z_t = sqrt(ab) x0 + sqrt(1 - ab) e
        al, be = c1 + (c2 - A[t]) * math.sqrt(ab), (c2 - A[t]) * math.sqrt(1 - ab)
        e2 = (al * m - C[t]) ** 2 + al * al * v + be * be
        total += float(normal_kl(math.sqrt(e2), math.log(pv), 0.0, math.log(S2[t])))
    ab0 = s.alphas_cumprod[0]
    g = 1 - A[0] * math.sqrt(ab0)
    r2 = (g * m - C[0]) ** 2 + g * g * v + A[0] ** 2 * (1 - ab0)
    total += 0.5 * math.log(2 * math.pi * S2[0]) + r2 / (2 * S2[0])
    # exact marginal of the model: propagate from the prior
    Mm, Vm = prior
    for t in range(T - 1, -1, -1):
        Mm, Vm = A[t] * Mm + C[t], A[t] ** 2 * Vm + S2[t]
    nll = 0.5 * math.log(2 * math.pi * Vm) + ((m - Mm) ** 2 + v) / (2 * Vm)
    return total, nll


@given(T=st.integers(1, 40), m=st.floats(-2, 2), logv=st.floats(-4, 1), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40)
def test_vlb_upper_bounds_exact_nll(T, m, logv, seed):
    s = dm.linear_schedule(T, 1e-3, 0.3) if T > 1 else dm.Schedule.from_betas([0.2])
    v = math.exp(logv)
    rng = np.random.default_rng(seed)
    A = rng.uniform(0.5, 1.5, T)
    C = rng.normal(0, 0.3, T)
    S2 = np.exp(rng.uniform(-6, 0, T))
    vlb, nll = _vlb_and_nll(s, m, v, A, C, S2)
    assert vlb >= nll - 1e-9 * abs(nll)


@given(T=st.integers(1, 60), m=st.floats(-2, 2), logv=st.floats(-4, 1))
@settings(max_examples=25)
def test_vlb_is_tight_for_the_exact_reverse_chain(T, m, logv):
    # With p = the true reverse of q (linear-Gaussian for Gaussian data) and the exact prior,
    # p(x_{0:T}) = q(x_{0:T}): the bound is tight and equals the data entropy.
    s = dm.cosine_schedule(T) if T > 1 else dm.Schedule.from_betas([0.3])
    v = math.exp(logv)
    M, V = _chain_moments(s, m, v)
    A, C, S2 = np.empty(T), np.empty(T), np.empty(T)
    for t in range(T):  # reverse of z_t = sqrt(alpha) z_{t-1} + sqrt(beta) xi; index t-1 = -1 is the data
        a = 1 - s.betas[t]
        A[t] = math.sqrt(a) * V[t] / V[t + 1]
        C[t] = M[t] - A[t] * M[t + 1]
        S2[t] = V[t] - A[t] ** 2 * V[t + 1]
    vlb, nll = _vlb_and_nll(s, m, v, A, C, S2, prior=(M[T], V[T]))
    assert_allclose(vlb, nll, rtol=1e-9, atol=1e-9)
    assert_allclose(nll, 0.5 * math.log(2 * math.pi * math.e * v), rtol=1e-9, atol=1e-9)


def _scipy_decoder_bits(x0, mean, sd, bins):
    """-log2 P(bin of x0) averaged over non-batch dims, from scipy.stats.norm CDF differences
    (edge bins take the tails)."""
    d = 1.0 / (bins - 1)
    lo = np.where(x0 <= -1, -np.inf, x0 - d)
    hi = np.where(x0 >= 1, np.inf, x0 + d)
    p = stats.norm.cdf(hi, mean, sd) - stats.norm.cdf(lo, mean, sd)
    return -np.log2(p).reshape(x0.shape[0], -1).mean(1)


def test_vb_terms_bpd_exact_posterior_is_zero_and_decoder_is_bits():
    s = dm.linear_schedule(100)
    rng = np.random.default_rng(3)
    x0 = np.round(rng.uniform(-1, 1, (4, 3, 2, 2)) * 127.5) / 127.5
    xt = rng.standard_normal(x0.shape)
    t = np.array([5, 50, 99, 1])
    mean, _, logv = q_posterior_mean_variance(s, x0, xt, t)
    out = vb_terms_bpd(s, mean, logv, x0, xt, t)
    assert out.shape == (4,)
    assert_allclose(out, 0.0, atol=1e-12)
    # t = 0: the decoder NLL in bits/dim
    m0 = x0 + 0.01
    lv = np.full_like(x0, math.log(1e-3))
    nll = vb_terms_bpd(s, m0, lv, x0, xt, np.zeros(4, dtype=int))
    assert_allclose(nll, _scipy_decoder_bits(x0, m0, math.sqrt(1e-3), 256), rtol=1e-9)
    # 17-level data (digits): the decoder uses bins of half-width 1/16
    x17 = np.round(rng.uniform(-1, 1, (4, 3, 2, 2)) * 8) / 8
    nll17 = vb_terms_bpd(s, x17 + 0.01, lv, x17, xt, 0, bins=17)
    assert_allclose(nll17, _scipy_decoder_bits(x17, x17 + 0.01, math.sqrt(1e-3), 17), rtol=1e-9)
    # a mixed batch picks per sample
    mixed = vb_terms_bpd(s, mean, logv, x0, xt, np.array([0, 50, 99, 0]))
    assert mixed[1] == pytest.approx(0.0, abs=1e-12) and mixed[0] > 0


def test_prior_bpd_closed_form():
    s = dm.linear_schedule(1000)
    x0 = np.linspace(-1, 1, 12).reshape(2, 6)
    ab = abar_by_product(s.betas, 999)
    kl = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x0**2 - 1)
    assert_allclose(prior_bpd(s, x0), kl.mean(1) / math.log(2), rtol=1e-10)


@given(s=schedules(max_T=3000, hi_max=0.9), data=st.data(), gamma=st.floats(0.5, 20))
@settings(max_examples=30)
def test_min_snr_weights_turn_each_mse_into_weighted_x0_mse(s, data, gamma):
    # Hang et al. (2023): w_eps ||eps - eps_th||^2 = w_v ||v - v_th||^2 = min(SNR, gamma) ||x0 - x0_th||^2.
    T = s.num_timesteps
    t = data.draw(st.integers(0, T - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x0, eps, eps_th = rng.standard_normal((3, 1, 8))
    ab = abar_by_product(s.betas, t)
    if not 1e-12 < ab < 1 - 1e-12:
        return
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    snr = ab / (1 - ab)
    target = min(snr, gamma) * np.sum((x0 - x0_from_eps(s, xt, t, eps_th)) ** 2)
    w_eps = snr_weight(s, t, "min_snr", gamma, prediction="eps")
    assert_allclose(w_eps * np.sum((eps - eps_th) ** 2), target, rtol=1e-8)
    v, v_th = v_from_x0_eps(s, t, x0, eps), rng.standard_normal((1, 8))
    target_v = min(snr, gamma) * np.sum((x0 - x0_from_v(s, xt, t, v_th)) ** 2)
    w_v = snr_weight(s, t, "min_snr", gamma, prediction="v")
    assert_allclose(w_v * np.sum((v - v_th) ** 2), target_v, rtol=1e-8)
    # the reference's 1 - ab (a plain product) carries relative error ~eps/(1 - ab)
    rt = 1e-12 + 4e-16 / (1 - ab)
    assert_allclose(snr_weight(s, t, "min_snr", gamma, prediction="x0"), min(snr, gamma), rtol=rt)
    assert_allclose(snr_weight(s, t, "snr"), snr, rtol=rt)


def test_simple_loss_matches_torch_mse():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    torch.testing.assert_close(simple_loss(a, b), torch.nn.functional.mse_loss(b, a))
    torch.testing.assert_close(
        simple_loss(a, b, reduction="none"), torch.nn.functional.mse_loss(b, a, reduction="none").mean((1, 2, 3))
    )


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("t", [10, 500, 990])
def test_ddpm_training_loss_of_the_bayes_predictor_is_the_posterior_variance(prediction, t):
    # DDPM Alg. 1 on 1-D data N(m, sd^2) with the exact conditional mean as the model: the
    # errors target - E[target | x_t] are i.i.d. N(0, V), V the posterior variance of the target,
    # written here from Gaussian conditioning (D = abar sd^2 + 1 - abar):
    #   eps: abar sd^2 / D,   x0: sd^2 (1 - abar) / D,   v: sd^2 / D.
    # So the summed loss / V ~ chi2(n): two-sided p > 1e-3 (seed 0, n = 20000); the Bayes
    # predictor of another target (a swapped target in the loss) must fail the same test.
    m, sd, n = 0.5, 0.3, 20000
    s = dm.linear_schedule(1000)
    ab = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1000)[: t + 1]))  # linear_schedule(1000), by product
    D = ab * sd**2 + 1 - ab
    V = {"eps": ab * sd**2 / D, "x0": sd**2 * (1 - ab) / D, "v": sd**2 / D}[prediction]
    rng = np.random.default_rng(0)
    x0 = m + sd * rng.standard_normal((n, 1))
    eps = rng.standard_normal((n, 1))

    def bayes(x_t, tt, target=prediction):
        assert tt == t
        r = (x_t - math.sqrt(ab) * m) / D
        e = math.sqrt(1 - ab) * r  # E[eps | x_t]
        x = m + math.sqrt(ab) * sd**2 * r  # E[x0 | x_t]
        return {"eps": e, "x0": x, "v": math.sqrt(ab) * e - math.sqrt(1 - ab) * x}[target]

    def p_two_sided(loss_sum):
        c = stats.chi2(n)
        return 2 * min(c.cdf(loss_sum / V), c.sf(loss_sum / V))

    total = dm.losses.ddpm_training_loss(s, bayes, x0, t, eps, prediction=prediction, reduction="sum")
    assert p_two_sided(float(total)) > 1e-3
    mean = dm.losses.ddpm_training_loss(s, bayes, x0, t, eps, prediction=prediction)
    assert_allclose(mean, total / n, rtol=1e-12)
    other = {"eps": "x0", "x0": "eps", "v": "x0"}[prediction]
    off = dm.losses.ddpm_training_loss(
        s, lambda x_t, tt: bayes(x_t, tt, other), x0, t, eps, prediction=prediction, reduction="sum"
    )
    assert p_two_sided(float(off)) < 1e-3
    # torch tensors give the numpy result (float64)
    tt = dm.losses.ddpm_training_loss(
        s, bayes, torch.from_numpy(x0), t, torch.from_numpy(eps), prediction=prediction, reduction="sum"
    )
    assert_allclose(tt.item(), total, rtol=1e-12)


def test_dsm_loss_is_eps_mse_in_disguise():
    # with x_noisy = x0 + sigma z and score_pred = -eps_hat / sigma, the NCSN-weighted DSM loss
    # is 1/2 sum_dims (z - eps_hat)^2 averaged over the batch, independently of sigma
    rng = np.random.default_rng(0)
    x0, z, eps_hat = rng.standard_normal((3, 6, 10))
    sigma = np.exp(rng.uniform(-3, 3, 6))
    xn = x0 + sigma[:, None] * z
    ours = dsm_loss(-eps_hat / sigma[:, None], xn, x0, sigma)
    assert_allclose(ours, 0.5 * np.sum((z - eps_hat) ** 2, axis=1).mean(), rtol=1e-12)
    assert dsm_loss(-(xn - x0) / sigma[:, None] ** 2, xn, x0, sigma) == pytest.approx(0.0, abs=1e-20)
    # tiny sigma: sigma^2 underflows float32 (and 1e-170 float64), the loss must not (was NaN)
    for dt, sig in ((torch.float32, 1e-25), (torch.float64, 1e-170)):
        xt = torch.zeros(x0.shape, dtype=dt)  # x0 = 0, so x_noisy = sigma z is representable
        xs = sig * torch.tensor(z, dtype=dt)
        got = dsm_loss(-torch.tensor(eps_hat, dtype=dt) / sig, xs, xt, sig)
        assert (
            torch.isfinite(got)
            and abs(got.item() - 0.5 * np.sum((z - eps_hat) ** 2, axis=1).mean()) < 1e-4 * got.item()
        )


def test_learned_range_endpoints():
    s = dm.cosine_schedule(50)
    t = np.array([0, 10, 49])
    v = np.stack([-np.ones(2), np.zeros(2), np.ones(2)])
    out = learned_range_log_variance(s, t, v)
    pv1 = s.betas[1] * (1 - s.alphas_cumprod[0]) / (1 - s.alphas_cumprod[1])  # clipped at t = 0
    assert_allclose(out[0], math.log(pv1), rtol=1e-12)
    pv = s.betas[10] * (1 - s.alphas_cumprod[9]) / (1 - s.alphas_cumprod[10])
    assert_allclose(out[1], 0.5 * (math.log(pv) + math.log(s.betas[10])), rtol=1e-12)
    assert_allclose(out[2], math.log(s.betas[49]), rtol=1e-12)


# ----------------------------------------------------------------------------- bad input
_S10, _X = dm.linear_schedule(10), np.zeros((2, 3))
_A, _B = torch.zeros(5, 3, 4, 4), torch.ones(5, 3, 4, 4)
_X0, _XN = np.random.default_rng(0).standard_normal((2, 6, 10))  # a batch of B = 6


BAD_INPUT = [
    (simple_loss, dict(eps=_A, eps_pred=_B, reduction="max"), ValueError, "reduction must be"),
    (
        dm.losses.ddpm_training_loss,
        dict(s=_S10, model=lambda x, t: x, x0=_X, t=1, noise=_X, prediction="score"),
        ValueError,
        "prediction must be one of eps, x0, v; got 'score'",
    ),
    (
        dm.losses.ddpm_training_loss,
        dict(s=_S10, model=lambda x, t: x, x0=_X, t=1, noise=_X, reduction="max"),
        ValueError,
        "reduction must be",
    ),
    (dm.losses.ddpm_training_loss, dict(s=_S10, model=None, x0=_X, t=1, noise=_X), TypeError, "model must be callable"),
    (dsm_loss, dict(score_pred=_X0, x_noisy=_XN, x0=_X0, sigma=-1.0), ValueError, "sigma must be finite and > 0"),
    (dsm_loss, dict(score_pred=_X0, x_noisy=_XN, x0=_X0, sigma=math.inf), ValueError, "sigma"),
    (dsm_loss, dict(score_pred=_X0, x_noisy=_XN, x0=_X0, sigma=True), TypeError, "sigma"),
    (dsm_loss, dict(score_pred=_X0, x_noisy=_XN, x0=_X0, sigma=np.array([1.0, -2.0, 1, 1, 1, 1])), ValueError, "sigma"),
    (dsm_loss, dict(score_pred=_X0, x_noisy=_XN, x0=_X0, sigma=np.ones(5)), ValueError, r"shape \(B,\) = \(6,\)"),
    (vlb_weight, dict(s=_S10, t=1, variance="medium"), ValueError, "variance must be 'small'"),
    (snr_weight, dict(s=_S10, t=1, prediction="score"), ValueError, "prediction must be"),
    (snr_weight, dict(s=_S10, t=1, kind="truncated"), ValueError, "kind must be"),
    (snr_weight, dict(s=_S10, t=1, gamma=-1.0), ValueError, "gamma must be"),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
