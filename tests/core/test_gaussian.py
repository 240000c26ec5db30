"""Gaussian KL and likelihoods against scipy integration, scipy CDFs and mpmath."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy import integrate, special, stats

from diffmath.gaussian import (
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    log_diff_ndtr,
    normal_kl,
    normal_log_prob,
)
from tests._tables import refusals


@given(m1=st.floats(-3, 3), lv1=st.floats(-4, 4), m2=st.floats(-3, 3), lv2=st.floats(-4, 4))
@settings(max_examples=30)
def test_normal_kl_equals_quadrature(m1, lv1, m2, lv2):
    # KL = int p log(p/q) dx by scipy.integrate.quad
    s1, s2 = math.exp(lv1 / 2), math.exp(lv2 / 2)
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    f = lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x))
    ref, err = integrate.quad(f, m1 - 40 * s1, m1 + 40 * s1, points=[m1], limit=200, epsabs=1e-13, epsrel=1e-11)
    assert_allclose(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-8, atol=1e-12)


# A libm call (numpy, scipy, torch) is assumed within 4 ulp of the exact value, whatever the CPU's
# vector unit (docs/numerics.md, "Tolerances"); one ulp is at most 2^-52 relative.
ULP = 2.0**-52
LIBM = 4 * ULP


def test_normal_kl_nearly_equal_gaussians_mpmath():
    # e^d - 1 - d for tiny d: the naive form loses all digits; ours keeps full relative precision.
    d = np.array([1e-12, -1e-9, 3e-6, -2e-3, 0.3, -0.49, 0.51, 5.0, -30.0])
    ours = normal_kl(0.0, d, 0.0, 0.0)
    with mp.workdps(50):
        ref = np.array([float(0.5 * (mp.exp(mp.mpf(x)) - 1 - mp.mpf(x))) for x in d.tolist()])
    # |d| < 0.5 is a polynomial in + and * (IEEE-exact operations, no libm): the same bits on every
    # CPU, held to 4e-16. Elsewhere expm1(d) - d: expm1's libm error (4 ulp of |expm1(d)|) is
    # amplified by |expm1(d)| / |expm1(d) - d| (4.3 at d = 0.51, where numpy's AVX2 expm1 gives
    # 4.9e-16 relative error and its AVX-512 one 2.2e-16), plus 2 roundings.
    poly = np.abs(d) < 0.5
    assert_allclose(ours[poly], ref[poly], rtol=4e-16)
    cond = np.abs(np.expm1(d)) / np.abs(np.expm1(d) - d)
    assert np.all(np.abs(ours - ref)[~poly] <= ((LIBM * cond + 2 * ULP) * np.abs(ref))[~poly])


@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 6))
def test_gaussian_kl_properties(seed, k):
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((k, k)), rng.standard_normal((k, k))
    c1, c2 = A @ A.T + 0.1 * np.eye(k), B @ B.T + 0.1 * np.eye(k)
    m1, m2 = rng.standard_normal(k), rng.standard_normal(k)
    kl = gaussian_kl(m1, c1, m2, c2)
    assert kl >= 0
    assert abs(gaussian_kl(m1, c1, m1, c1)) < 1e-12
    # diagonal covariances reduce to the sum of elementwise normal_kl
    d1, d2 = np.diag(np.diag(c1)), np.diag(np.diag(c2))
    assert_allclose(
        gaussian_kl(m1, d1, m2, d2), normal_kl(m1, np.log(np.diag(c1)), m2, np.log(np.diag(c2))).sum(), rtol=1e-10
    )
    # against the textbook formula with an explicit inverse and determinants (numpy)
    inv2 = np.linalg.inv(c2)
    ref = 0.5 * (
        np.trace(inv2 @ c1) + (m2 - m1) @ inv2 @ (m2 - m1) - k + np.linalg.slogdet(c2)[1] - np.linalg.slogdet(c1)[1]
    )
    assert_allclose(kl, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", range(3))
def test_gaussian_kl_2d_numerical_integration(case):
    rng = np.random.default_rng(case)
    A, B = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    c1, c2 = A @ A.T + 0.3 * np.eye(2), B @ B.T + 0.3 * np.eye(2)
    m1, m2 = rng.standard_normal(2), rng.standard_normal(2)
    p, q = stats.multivariate_normal(m1, c1), stats.multivariate_normal(m2, c2)
    # integrate in p's whitened coordinates: x = m1 + L1 u, dx = |det L1| du
    L1 = np.linalg.cholesky(c1)
    det = abs(np.linalg.det(L1))

    def f(u2, u1):
        x = m1 + L1 @ np.array([u1, u2])
        return det * p.pdf(x) * (p.logpdf(x) - q.logpdf(x))

    ref, _ = integrate.dblquad(f, -9, 9, -9, 9, epsabs=1e-10, epsrel=1e-9)
    assert_allclose(gaussian_kl(m1, c1, m2, c2), ref, rtol=1e-6)


def test_gaussian_kl_batched_numpy_and_torch_agree():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((4, 3, 3))
    c1 = A @ np.swapaxes(A, -1, -2) + 0.5 * np.eye(3)
    c2 = np.eye(3) * 2.0  # broadcast over the batch
    m1, m2 = rng.standard_normal((4, 3)), np.zeros(3)
    ours = gaussian_kl(m1, c1, m2, c2)
    assert ours.shape == (4,)
    each = [gaussian_kl(m1[i], c1[i], m2, c2) for i in range(4)]
    assert_allclose(ours, each, rtol=1e-13)
    tt = gaussian_kl(torch.tensor(m1), torch.tensor(c1), torch.tensor(m2), torch.tensor(c2))
    assert_allclose(tt.numpy(), ours, rtol=1e-12)


def test_normal_log_prob_matches_scipy():
    x = np.linspace(-5, 5, 11)
    ref = stats.norm.logpdf(x, 0.3, np.sqrt(2.0))
    assert_allclose(normal_log_prob(x, 0.3, np.log(2.0)), ref, rtol=1e-14)
    # python-float parameters with a float64 tensor keep float64 (not rounded through float32)
    assert_allclose(normal_log_prob(torch.tensor(x), 0.3, float(np.log(2.0))).numpy(), ref, rtol=1e-14)
    assert_allclose(normal_kl(torch.tensor(x), 0.1, 0.3, -0.2).numpy(), normal_kl(x, 0.1, 0.3, -0.2), rtol=1e-14)


def test_result_dtype_is_the_promoted_input_dtype():
    # was: the first tensor's dtype (so the argument order decided), and numpy float16 came back float32
    a32, a64 = torch.randn(3), torch.randn(3, dtype=torch.float64)
    assert normal_log_prob(a32, a64, 0.0).dtype == torch.float64
    assert normal_log_prob(a64, a32, 0.0).dtype == torch.float64
    assert normal_kl(a32, 0.0, a64, 0.0).dtype == torch.float64
    h = torch.randn(3).half()
    assert normal_log_prob(h, 0.0, 0.0).dtype == torch.float16
    assert normal_log_prob(h.numpy(), 0.0, 0.0).dtype == np.float16
    assert normal_log_prob(np.zeros(3, np.float32), np.zeros(3), 0.0).dtype == np.float64
    assert normal_log_prob(torch.arange(3), 0.0, 0.0).dtype == torch.float64  # no floating tensor: float64
    # half inputs compute in float32: the float16 result is the float32 one rounded
    ref = stats.norm.logpdf(h.double().numpy(), 0.0, 1.0)
    assert_allclose(normal_log_prob(h, 0.0, 0.0).double().numpy(), ref, rtol=1e-3)


# ----------------------------------------------------------------------------- decoder
def _mp_log_bin_prob(x, mean, log_scale, bins):
    """log P(bin of x) in 60-digit mpmath with exact erfc."""
    with mp.workdps(400):
        delta = mp.mpf(1) / (bins - 1)
        s = mp.exp(mp.mpf(log_scale))
        ncdf = lambda z: mp.erfc(-z / mp.sqrt(2)) / 2
        lo = -mp.inf if x < -1 + 0.5 / (bins - 1) else (mp.mpf(x) - delta - mean) / s
        hi = mp.inf if x > 1 - 0.5 / (bins - 1) else (mp.mpf(x) + delta - mean) / s
        plo = 0 if lo == -mp.inf else ncdf(lo)
        phi = 1 if hi == mp.inf else ncdf(hi)
        return mp.log(phi - plo)


def test_decoder_matches_scipy_cdf_differences():
    bins = 256
    x = np.linspace(-1, 1, bins)
    mean, ls = 0.1, np.log(0.3)
    delta = 1 / (bins - 1)
    cdf_hi = np.where(x > 0.999, 1.0, stats.norm.cdf(x + delta, mean, 0.3))
    cdf_lo = np.where(x < -0.999, 0.0, stats.norm.cdf(x - delta, mean, 0.3))
    assert_allclose(discretized_gaussian_log_likelihood(x, mean, ls), np.log(cdf_hi - cdf_lo), rtol=1e-10)


@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, np.log(0.5)), (0.9, np.log(1e-3)), (-3.0, 0.0), (0.37, np.log(0.01)), (0.0, np.log(50.0))]
)
def test_decoder_probabilities_sum_to_one(mean, log_scale):
    x = np.linspace(-1, 1, 256)
    lp = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert np.all(np.isfinite(lp))
    assert abs(special.logsumexp(lp)) < 1e-12


@pytest.mark.parametrize("bins", [2, 17, 256])
def test_decoder_matches_mpmath_in_far_tails(bins):
    # means far from x and tiny scales: probabilities down to 1e-300
    rng = np.random.default_rng(bins)
    x = np.round(rng.uniform(0, bins - 1, 40)) / (bins - 1) * 2 - 1
    mean = rng.uniform(-1, 1, 40)
    ls = np.log(np.abs(x - mean) / rng.uniform(2, 30, 40) + 1e-4)
    ours = discretized_gaussian_log_likelihood(x, mean, ls, bins=bins)
    ref = [float(_mp_log_bin_prob(float(a), float(m), float(l), bins)) for a, m, l in zip(x, mean, ls)]
    assert_allclose(ours, ref, rtol=1e-9)


def test_tanh_approximation_is_off_where_we_are_exact():
    # guided-diffusion's approx_standard_normal_cdf: 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    approx = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    x, mean, ls = np.array([0.5]), np.array([0.0]), np.array([np.log(0.1)])  # 5 sigma out
    delta = 1 / 255
    zhi, zlo = (x + delta - mean) / 0.1, (x - delta - mean) / 0.1
    approx_p = approx(zhi) - approx(zlo)
    exact = math.exp(float(_mp_log_bin_prob(0.5, 0.0, float(ls[0]), 256)))
    assert abs(approx_p[0] - exact) / exact > 0.2  # the approximation is tens of percent off here
    ours = math.exp(discretized_gaussian_log_likelihood(x, mean, ls)[0])
    assert abs(ours - exact) / exact < 1e-12


def test_log_diff_ndtr_all_regimes():
    a = np.array([-40.0, -1e-9, 0.0, 3.0, 30.0, -np.inf, -np.inf, 5.0])
    b = np.array([-39.0, 1e-9, 1e-12, 3.0 + 1e-8, 31.0, -50.0, np.inf, np.inf])
    ours = log_diff_ndtr(a, b)
    with mp.workdps(400):  # enough digits for 1 - Phi(30) ~ 5e-198 without mirroring
        ncdf = lambda z: mp.erfc(-mp.mpf(z) / mp.sqrt(2)) / 2 if np.isfinite(z) else (1 if z > 0 else 0)
        ref = np.array([float(mp.log(ncdf(bb) - ncdf(aa))) for aa, bb in zip(a, b)])
        # both limits in one tail: log Phi(hi) + log1mexp(y), y = log Phi(lo) - log Phi(hi) formed
        # from two libm values (4 ulp of |log Phi| each); log1mexp turns y's absolute error into
        # an absolute error / |y| of the result. Narrow tail bins ([3, 3 + 1e-8]: |y| = 4.4e-8,
        # |log Phi| = 6.6) are conditioned by that, not by the 1e-9 of the other regimes.
        cond = np.zeros(len(a))
        for i, (aa, bb) in enumerate(zip(a, b)):
            lo, hi = (-bb, -aa) if aa > 0 else (aa, bb)
            if hi <= 0 and np.isfinite(lo):
                llo, lhi = mp.log(ncdf(lo)), mp.log(ncdf(hi))
                cond[i] = float((abs(llo) + abs(lhi)) / abs(llo - lhi))
    bound = 1e-9 * np.abs(ref) + LIBM * cond
    assert np.all(np.abs(ours - ref) <= bound), (ours - ref, bound)
    tt = log_diff_ndtr(torch.tensor(a), torch.tensor(b))
    assert np.all(np.abs(tt.numpy() - ref) <= bound), (tt.numpy() - ref, bound)


def test_decoder_gradient_is_finite_at_the_edges():
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([-2.0, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    lp = discretized_gaussian_log_likelihood(x, mean, ls).sum()
    lp.backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(ls.grad).all()
    torch.autograd.gradcheck(
        lambda m, s: discretized_gaussian_log_likelihood(x, m, s),
        (mean.detach().requires_grad_(), ls.detach().requires_grad_()),
    )


# ----------------------------------------------------------------------------- extreme finite input
def _mp_kl(m1, lv1, m2, lv2):
    with mp.workdps(60):
        m1, lv1, m2, lv2 = (mp.mpf(v) for v in (m1, lv1, m2, lv2))
        d = lv1 - lv2
        return 0.5 * (mp.expm1(d) - d + (m1 - m2) ** 2 * mp.exp(-lv2))


def _mp_logpdf(x, m, lv):
    with mp.workdps(60):
        x, m, lv = (mp.mpf(v) for v in (x, m, lv))
        return -0.5 * (mp.log(2 * mp.pi) + lv + (x - m) ** 2 * mp.exp(-lv))


EXTREME = [  # (m1, lv1, m2, lv2): 0 * e^800 was NaN, inf * 0 (1e160^2 * e^-700) was NaN too
    (0.0, 0.0, 0.0, -800.0),  # the issue's case: +inf, not NaN
    (0.0, 0.0, 0.0, -1500.0),  # e^{lv2/2} overflows as well
    (1e160, 0.0, 0.0, 700.0),  # 9.9e15: (m1 - m2)^2 overflows, e^{-lv2} nearly underflows
    (1e200, 0.0, -1e200, 800.0),  # m1 - m2 = 2e200, (2e200)^2 e^-800 = 1.1e53
    (1e-200, 0.0, 0.0, -700.0),  # (1e-200)^2 underflows to 0; the e^700 term dominates anyway
    (1e-200, 5.0, 0.0, -5.0),  # 1e-400 e^5 is below the float range: the e^10 term stands
    (0.0, 1e308, 0.0, -1e308),  # lv1 - lv2 overflows: +inf, not inf - inf
    (0.0, -1e308, 0.0, 1e308),  # -inf difference: the KL is lv2/2 - ... = +inf
    (3.0, -2.0, -1.0, 1.5),  # an ordinary case, unchanged
]


@pytest.mark.parametrize("m1,lv1,m2,lv2", EXTREME)
def test_normal_kl_of_extreme_finite_input_is_a_number_or_inf(m1, lv1, m2, lv2):
    ref = _mp_kl(m1, lv1, m2, lv2)
    fmax = np.finfo(np.float64).max
    args = [np.array([v]) for v in (m1, lv1, m2, lv2)]
    for out in (normal_kl(*args)[0], normal_kl(*(torch.tensor(a) for a in args))[0].item()):
        assert not math.isnan(out)
        if ref > fmax:
            assert out == math.inf
        else:  # a few roundings of e^x (4 ulp each, docs/numerics.md) on top of the plain products
            assert out == pytest.approx(float(ref), rel=1e-14)
    # float32 tensors: the same within float32's range (where the inputs are float32 numbers)
    a32 = [torch.tensor(a, dtype=torch.float32) for a in args]
    if all(bool(torch.isfinite(a).all()) for a in a32):
        out32 = normal_kl(*a32)[0].item()
        assert not math.isnan(out32)
        assert out32 == math.inf if ref > np.finfo(np.float32).max else out32 == pytest.approx(float(ref), rel=1e-5)


def test_normal_kl_issue_case_and_normal_log_prob_at_tiny_variance():
    assert normal_kl(0.0, 0.0, 0.0, -800.0) == math.inf
    assert normal_kl(torch.tensor(0.0), 0.0, 0.0, -100.0).item() == math.inf  # float32: e^100 overflows
    # x = mean with a tiny variance: a finite log-density (was 0 * inf = NaN)
    for lv in (-800.0, -1500.0):
        assert normal_log_prob(0.0, 0.0, lv) == pytest.approx(float(_mp_logpdf(0, 0, lv)), rel=1e-15)
        assert normal_log_prob(torch.zeros(1, dtype=torch.float64), 0.0, lv).item() == pytest.approx(
            float(_mp_logpdf(0, 0, lv)), rel=1e-15
        )
    assert normal_log_prob(1.0, 0.0, -800.0) == -math.inf
    assert normal_log_prob(1e160, 0.0, 700.0) == pytest.approx(float(_mp_logpdf(1e160, 0, 700)), rel=1e-14)
    # the gradient of an ordinary entry is unchanged beside an extreme one
    m = torch.tensor([0.5, 0.0], dtype=torch.float64, requires_grad=True)
    lv2 = torch.tensor([0.3, -800.0], dtype=torch.float64)
    kl = normal_kl(m, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), lv2)
    kl[0].backward()
    assert m.grad[0].item() == pytest.approx(0.5 * math.exp(-0.3), rel=1e-15)


# ----------------------------------------------------------------------------- bad input
_BAD_PD = np.array([[1.0, 2.0], [2.0, 1.0]])


def _complex_rows(kind):
    # torch's .to(float64) drops the imaginary part with only a warning: normal_kl(1 + 5j, ...)
    # returned the KL of 1
    z = torch.tensor([1.0 + 5.0j]) if kind == "tensor" else np.array([1.0 + 5.0j])
    r = torch.zeros(1, dtype=torch.float64) if kind == "tensor" else np.zeros(1)
    rows = [
        (normal_kl, dict(mean1=z, logvar1=r, mean2=r, logvar2=r), TypeError, "mean1 must be a real"),
        (normal_kl, dict(mean1=r, logvar1=r, mean2=r, logvar2=z), TypeError, "logvar2 must be a real"),
        (normal_log_prob, dict(x=r, mean=z, logvar=r), TypeError, "mean must be a real"),
        (
            gaussian_kl,
            dict(mu1=r, cov1=z.reshape(1, 1), mu2=r, cov2=r.reshape(1, 1) + 1),
            TypeError,
            "cov1 must be a real",
        ),
        (discretized_gaussian_log_likelihood, dict(x=r, mean=r, log_scale=z), TypeError, "log_scale must be a real"),
    ]
    if kind == "tensor":  # and a complex tensor beside python floats
        rows += [
            (normal_kl, dict(mean1=0.0, logvar1=0.0, mean2=z, logvar2=0.0), TypeError, "mean2 must be a real"),
            (normal_log_prob, dict(x=torch.tensor([True]), mean=0.0, logvar=0.0), TypeError, "x must be a real"),
        ]
    return rows


def _non_finite_logvar_rows(bad):
    # normal_kl(0, 0, 0, -inf) was NaN and normal_log_prob checked nothing
    return [
        (
            normal_kl,
            dict(mean1=0.0, logvar1=np.array([bad]), mean2=0.0, logvar2=0.0),
            ValueError,
            "logvar1 must be a finite log-variance",
        ),
        (
            normal_log_prob,
            dict(x=np.zeros(2), mean=0.0, logvar=np.array([0.0, bad])),
            ValueError,
            "logvar must be a finite log-variance",
        ),
        (
            normal_log_prob,
            dict(x=torch.zeros(2), mean=0.0, logvar=torch.tensor([bad, 0.0])),
            ValueError,
            "logvar must be a finite log-variance",
        ),
    ]


BAD_INPUT = [
    (
        gaussian_kl,
        dict(mu1=np.zeros(2), cov1=np.eye(2), mu2=np.zeros(2), cov2=_BAD_PD),
        ValueError,
        "cov2 must be positive definite",
    ),
    (
        gaussian_kl,
        dict(mu1=np.zeros(2), cov1=np.array([[1.0, 0.5], [0.0, 1.0]]), mu2=np.zeros(2), cov2=np.eye(2)),
        ValueError,
        "cov1 must be symmetric",
    ),
    (
        gaussian_kl,
        dict(mu1=np.zeros(3), cov1=np.eye(2), mu2=np.zeros(2), cov2=np.eye(2)),
        ValueError,
        r"mu1 must have shape \(\.\.\., 2\)",
    ),
    (
        normal_kl,
        dict(mean1=0.0, logvar1=0.0, mean2=0.0, logvar2=np.array([0.0, np.nan])),
        ValueError,
        "logvar2 must be a finite log-variance",
    ),
    *(row for bad in (np.nan, np.inf, -np.inf) for row in _non_finite_logvar_rows(bad)),
    (
        discretized_gaussian_log_likelihood,
        dict(x=np.array([1.5]), mean=0.0, log_scale=0.0),
        ValueError,
        r"x must lie in \[-1, 1\]",
    ),
    (
        discretized_gaussian_log_likelihood,
        dict(x=np.array([0.5]), mean=0.0, log_scale=0.0, bins=1),
        ValueError,
        "bins must be an integer >= 2",
    ),
    # complex input is refused, not cast to real
    *_complex_rows("tensor"),
    *_complex_rows("numpy"),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
