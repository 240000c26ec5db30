"""Langevin dynamics: ULA's stationary variance derived from its linear recursion and checked
by a KS test; the corrector's signal-to-noise definition; its heavy tails in 1-D; and NCSN's
annealed chain against the exactly propagated variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import stats

from diffmath.samplers import (
    annealed_langevin,
    annealed_step_sizes,
    geometric_sigmas,
    langevin_corrector_step,
    langevin_step,
)
from tests._tables import refusals


@settings(max_examples=50, deadline=None)
@given(sigma=st.floats(1e-3, 1e3), ratio=st.floats(1e-6, 3.9))
def test_ula_stationary_variance_from_the_linear_recursion(sigma, ratio):
    # For p = N(0, sigma^2), score = -x/sigma^2 and the step is x' = a x + c z. Read 1 - a and
    # c off langevin_step itself; the fixed point of V = a^2 V + c^2 is c^2 / ((1 - a)(1 + a)),
    # which must equal sigma^2 / (1 - eps/(4 sigma^2)) (derived by hand: a = 1 - eps/(2 sigma^2),
    # c^2 = eps, 1 - a^2 = eps/sigma^2 - eps^2/(4 sigma^4)).
    eps = ratio * sigma**2
    x = np.array([[1.0], [0.0]])
    out = langevin_step(x, -x / sigma**2, eps, np.array([[0.0], [1.0]]))
    one_minus_a, c = 1.0 - out[0, 0], out[1, 0]
    V = c * c / (one_minus_a * (2.0 - one_minus_a))
    assert_allclose(V, sigma**2 / (1 - eps / (4 * sigma**2)), rtol=1e-8)
    assert 0 < one_minus_a < 2  # the chain is stable for eps < 4 sigma^2


def test_ula_stationary_distribution_ks():
    # 20000 chains, 120 steps of size eps = sigma^2 from N(mu, sigma^2) (contraction 0.5 per
    # step: converged to 1e-36), then scipy.stats.kstest at seed 0: not rejected against the derived
    # N(mu, sigma^2/(1 - eps/(4 sigma^2))) (p > 0.01), rejected against N(mu, sigma^2) (p < 1e-6).
    mu, sigma = 1.5, 2.0
    eps = sigma**2
    rng = np.random.default_rng(0)
    x = mu + sigma * rng.standard_normal((20000, 1))
    for _ in range(120):
        x = langevin_step(x, -(x - mu) / sigma**2, eps, rng.standard_normal(x.shape))
    sd = sigma / math.sqrt(1 - eps / (4 * sigma**2))
    assert stats.kstest(x[:, 0], "norm", args=(mu, sd)).pvalue > 0.01
    assert stats.kstest(x[:, 0], "norm", args=(mu, sigma)).pvalue < 1e-6


def test_corrector_step_has_the_requested_signal_to_noise_ratio():
    # Song et al. 2021, Alg. 4-5: x' = x + A score + B z is a Langevin move (B = sqrt(2 A)) whose
    # step makes ||A score|| / ||B z|| = sqrt(alpha) snr, per sample ("sample") or for the
    # batch-mean norms ("batch"). Solve x' - x = A s + B z for (A, B) by least squares.
    rng = np.random.default_rng(3)
    x, s, z = rng.normal(size=(3, 5, 2, 3))
    s[1] *= 40.0
    S, Z = s.reshape(5, -1), z.reshape(5, -1)
    for norm in ("sample", "batch"):
        for alpha in (1.0, 0.7):
            d = (langevin_corrector_step(s, x, 0.16, z, alpha=alpha, norm=norm) - x).reshape(5, -1)
            AB = np.array([np.linalg.lstsq(np.stack([S[i], Z[i]], 1), d[i], rcond=None)[0] for i in range(5)])
            A, B = AB[:, 0], AB[:, 1]
            assert_allclose(B, np.sqrt(2 * A), rtol=1e-9)
            sn, zn = np.linalg.norm(S, axis=1), np.linalg.norm(Z, axis=1)
            if norm == "sample":
                assert_allclose(A * sn / (B * zn), math.sqrt(alpha) * 0.16, rtol=1e-9)
            else:
                assert_allclose(A * sn.mean() / (B * zn.mean()), math.sqrt(alpha) * 0.16, rtol=1e-9)
                assert np.ptp(A) < 1e-9 * A.mean()


def test_per_sample_corrector_has_tails_one_over_r_in_one_dimension():
    # For x ~ N(0, 1) with score -x, the per-sample step moves x by
    # D = (z^2/|x|) (b sgn z - a sgn x), a = 2 alpha snr^2, b = 2 sqrt(alpha) snr. Near x = 0,
    # P(|D| > r) ~ P(|x| < c z^2 / r) -> 2 phi(0) E[z^2] E[c] / r = 2 b / (sqrt(2 pi) r):
    # an infinite mean, so the output's KL to any Gaussian is +inf. Monte Carlo, 10^6 draws,
    # seed 0, the count compared with its binomial standard error (5 SE).
    n, r, snr = 1_000_000, 200.0, 0.16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1))
    z = rng.standard_normal((n, 1))
    d = langevin_corrector_step(-x, x, snr, z, norm="sample") - x
    p_hat = np.mean(np.abs(d) > r)
    p = 2 * (2 * snr) / (math.sqrt(2 * math.pi) * r)
    assert abs(p_hat - p) < 5 * math.sqrt(p * (1 - p) / n), (p_hat, p)


def test_annealed_langevin_matches_the_exact_linear_chain():
    # Data N(m, v); the score at level sigma is -(x - m)/(v + sigma^2), so each step is
    # x' - m = a_i (x - m) + sqrt(alpha_i) z with a_i = 1 - alpha_i / (2 (v + sigma_i^2)).
    # Propagate mean/variance exactly here; compare 20000 samples (seed 0) with a z-test on the
    # mean and on the variance (SE sqrt(2/n) V) at 5 SE.
    m, v = 0.3, 0.05
    sig = geometric_sigmas(1.0, 0.01, 6)
    seen = []

    def score(x, sigma):
        assert sigma.shape == (x.shape[0],)
        seen.append(float(sigma[0]))
        return -(x - m) / (v + sigma[:, None] ** 2)

    n, k = 20000, 30
    out = annealed_langevin(score, sig, (n, 1), n_steps_each=k, step_lr=2e-3, generator=np.random.default_rng(0))
    dev, var = -m, sig[0] ** 2  # x - m starts at N(-m, sigma_1^2)
    for s_i, a_i in zip(sig, 2e-3 * (sig / sig[-1]) ** 2):
        a = 1 - a_i / (2 * (v + s_i**2))
        for _ in range(k):
            dev, var = a * dev, a * a * var + a_i
    mean_exact = m + dev
    assert abs(out.mean() - mean_exact) < 5 * math.sqrt(var / n)
    assert abs(out.var() - var) < 5 * math.sqrt(2 / n) * var
    assert seen[::k] == sig.tolist()
    assert_allclose(annealed_step_sizes(sig, 2e-3), 2e-3 * sig**2 / sig[-1] ** 2, rtol=1e-15)


def test_torch_langevin_and_dtypes():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = langevin_step(x, -x, 0.1, torch.zeros_like(x))
    assert out.dtype == torch.float32
    assert_allclose(out.numpy(), (x * 0.95).numpy(), rtol=1e-6)
    out = langevin_step(x, -x, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.zeros_like(x))
    assert_allclose(out.numpy(), (x * (1 - 0.5 * torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None])).numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input
_X = np.ones((2, 3))


def _minus_y(y, s):
    return -y


BAD_INPUT = [
    (
        langevin_step,
        dict(x=_X, score=_X, step_size=0.0, noise=_X),
        ValueError,
        r"step_size must be finite and > 0; got step_size = 0.0",
    ),
    (
        langevin_step,
        dict(x=_X, score=_X, step_size=np.array([0.1, -1.0]), noise=_X),
        ValueError,
        r"step_size must be finite and > 0; got step_size = -1.0",
    ),
    (
        langevin_corrector_step,
        dict(score=_X, x=_X, snr=0.0, noise=_X),
        ValueError,
        r"snr must be finite and > 0; got snr = 0.0",
    ),
    (
        langevin_corrector_step,
        dict(score=_X, x=_X, snr=-0.1, noise=_X),
        ValueError,
        r"snr must be finite and > 0; got snr = -0.1",
    ),
    (
        langevin_step,
        dict(x=_X, score=_X[:, :1], step_size=0.1, noise=_X),
        ValueError,
        r"score must have the shape of x \(2, 3\); got \(2, 1\)",
    ),
    (
        annealed_langevin,
        dict(score_model=_minus_y, sigmas=[1.0, 0.1], shape=(2, 3), step_lr=0.0),
        ValueError,
        r"step_lr must be finite and > 0; got step_lr = 0.0",
    ),
    (annealed_langevin, dict(score_model=_minus_y, sigmas=[0.1, 1.0], shape=(2, 3)), ValueError, "strictly descending"),
    (
        annealed_langevin,
        dict(score_model=_minus_y, sigmas=[1.0, 0.1], shape=(2, 3), n_steps_each=0),
        ValueError,
        r"n_steps_each must be an integer >= 1; got n_steps_each = 0",
    ),
    (
        annealed_langevin,
        dict(score_model=lambda y, s: s, sigmas=[1.0, 0.1], shape=(2, 3), n_steps_each=1),
        ValueError,
        r"score_model returned shape \(2,\) but x has shape \(2, 3\)",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
