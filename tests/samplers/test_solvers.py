"""The sigma-space solvers (diffmath.samplers.solvers) judged against independent references:

- known equivalences with code that shares nothing with them: Euler on the schedule's own
  sigmas is DDIM (``sample_ddim``), Euler ancestral is DDIM with eta (Song et al. 2021, eq. 16);
  UniP-2 with B(h) = 1 - e^{-h} is DPM-Solver++(2M) and UniP-3 is the exact quadratic
  exponential integrator (Zhao et al. 2023), i.e. DPM-Solver++(3M) at eta = 0;
- mpmath / scipy quad for phi_k, the ancestral split and the LMS weights;
- the oracle's exact output distribution against Monte Carlo runs of the same solver (z-tests,
  fixed seeds), and the measured order of convergence against the theory;
- k-diffusion's sample_dpmpp_2m numbers quoted in issue 13 (same algorithm, same ladder);
- the conventions: state precision, inputs untouched, callback, checks at the door.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from scipy.integrate import quad

from diffmath.denoiser import Denoiser
from diffmath.oracle import GaussianData
from diffmath.samplers import (
    SOLVERS,
    ancestral_step,
    lms_coefficients,
    phi,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
    sigmas_exponential,
    sigmas_from_schedule,
    sigmas_karras,
)
from diffmath.samplers.solvers import dpmpp_multistep_step, unipc_corrector_step, unipc_predictor_step
from diffmath.schedules import linear_schedule
from tests._tables import refusals

S = linear_schedule(1000)
SIG_MIN, SIG_MAX = float(S.sqrt_recipm1_alphas_cumprod[0]), float(S.sqrt_recipm1_alphas_cumprod[-1])
DATA2 = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.02]])
DATA1 = GaussianData([0.5], [[0.01]])

# (name, options) of every solver configuration; the stochastic ones inject noise
CONFIGS = [
    ("euler", {}),
    ("euler", {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 10.0}),
    ("heun", {}),
    ("edm", {"S_churn": 3.0, "S_noise": 1.003}),
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {"eta": 0.6, "third_order": "damped"}),
    ("unipc", {}),
    ("unipc", {"order": 3, "variant": "bh1"}),
    ("lms", {}),
]
STOCHASTIC = {"euler", "edm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}


def _id(c):
    return c[0] + "".join(f"-{k}={v}" for k, v in c[1].items())


# ----------------------------------------------------------------------------- coefficients
def test_phi_against_mpmath():
    mp.mp.dps = 80  # the reference subtracts the Taylor polynomial: 80 digits cover z^4 at z = 1e-8
    for k in range(1, 5):
        for z in (-1e-8, -0.01, -0.5, -1.9999, -2.0, -3.0, -10.0, -60.0, 0.3):
            zz = mp.mpf(z)
            ref = (mp.exp(zz) - sum(zz**j / mp.factorial(j) for j in range(k))) / zz**k
            assert phi(k, z) == pytest.approx(float(ref), rel=1e-14, abs=0), (k, z)
    assert phi(0, -1.0) == pytest.approx(math.exp(-1.0), rel=1e-15)


def test_ancestral_step_against_mpmath():
    mp.mp.dps = 40
    for s, sn, eta in [
        (10.0, 5.0, 1.0),
        (1.0, 0.999, 1.0),
        (80.0, 0.002, 0.5),
        (3.0, 2.0, 1.7),
        (3.0, 2.0, 0.0),
        (1.0, 0.0, 1.0),
    ]:
        S_, N_ = mp.mpf(s), mp.mpf(sn)
        up = mp.sqrt(min(N_**2, eta**2 * N_**2 * (S_**2 - N_**2) / S_**2))
        down = mp.sqrt(N_**2 - up**2)
        d, u = ancestral_step(s, sn, eta)
        assert (d, u) == (
            pytest.approx(float(down), rel=1e-14, abs=1e-300),
            pytest.approx(float(up), rel=1e-14, abs=1e-300),
        )


def test_lms_coefficients_against_quad():
    sig = sigmas_karras(12, 0.01, 157.4)
    for i in range(11):
        for order in range(1, min(i + 1, 4) + 1):

            def basis(tau, j):
                return math.prod((tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(order) if k != j)

            ref = [quad(basis, sig[i], sig[i + 1], args=(j,), epsrel=1e-13, epsabs=0)[0] for j in range(order)]
            # the Lagrange weights can be large and cancel: compare to the sum of their sizes
            assert_allclose(lms_coefficients(sig, i, order), ref, rtol=0, atol=1e-11 * np.abs(ref).sum())


# ----------------------------------------------------------------------------- equivalences
def _eps_denoiser():
    return Denoiser.from_schedule(lambda a, t: DATA2.eps(a, t, S), S)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_is_ddim(spacing):
    """DDIM (eta = 0) is Euler's method on the probability flow in (sigma, x / sqrt(abar))
    (Song et al. 2021, eq. 14)."""
    x_T = np.random.default_rng(0).standard_normal((9, 2))
    ref = sample_ddim(lambda a, t: DATA2.eps(a, t, S), S, x_T.shape, steps=12, spacing=spacing, x_T=x_T)
    sig = sigmas_from_schedule(S, 12, spacing)
    out = sample_euler(_eps_denoiser(), x_T * math.sqrt(1.0 + sig[0] ** 2), sig)
    assert_allclose(out, ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_euler_ancestral_is_ddim_eta(eta):
    """DDIM with eta > 0 is Euler ancestral with sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2)
    / sigma^2) (DDIM eq. 16 divided by sqrt(abar_prev)); same noise draws, same order."""
    x_T = np.random.default_rng(1).standard_normal((6, 2))
    ref = sample_ddim(
        lambda a, t: DATA2.eps(a, t, S),
        S,
        x_T.shape,
        steps=8,
        eta=eta,
        spacing="trailing",
        x_T=x_T,
        generator=np.random.default_rng(5),
    )
    sig = sigmas_from_schedule(S, 8, "trailing")
    out = sample_euler_ancestral(
        _eps_denoiser(), x_T * math.sqrt(1.0 + sig[0] ** 2), sig, eta=eta, generator=np.random.default_rng(5)
    )
    assert_allclose(out, ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
    "make", [lambda n: sigmas_karras(n, 0.01, 157.4), lambda n: sigmas_exponential(n, 0.01, 157.4)]
)
def test_multistep_equivalences(make):
    sig = make(15)
    x = np.random.default_rng(2).standard_normal((5, 2)) * sig[0]
    D = DATA2.denoise
    two_m = sample_dpmpp_2m(D, x, sig)
    # UniP-2 with B(h) = 1 - e^{-h} and a = 1/2 is DPM-Solver++(2M) (Zhao et al. 2023)
    assert_allclose(sample_unipc(D, x, sig, order=2, variant="bh2", corrector=False), two_m, rtol=1e-12, atol=1e-13)
    # the SDE family at eta = 0 with the midpoint term is the ODE solver
    assert_allclose(sample_dpmpp_2m_sde(D, x, sig, eta=0.0), two_m, rtol=1e-12, atol=1e-13)
    # EDM Alg. 2 without churn is Alg. 1
    assert_array_equal(sample_edm(D, x, sig), sample_heun(D, x, sig))
    # LMS of order 1 and Euler take the same step
    assert_allclose(sample_lms(D, x, sig, order=1), sample_euler(D, x, sig), rtol=1e-12, atol=1e-13)
    # first-order UniPC without corrector and euler_ancestral(eta=0) are DDIM too
    assert_allclose(sample_unipc(D, x, sig, order=1, corrector=False), sample_euler(D, x, sig), rtol=1e-12, atol=1e-13)
    assert_allclose(sample_euler_ancestral(D, x, sig, eta=0.0), sample_euler(D, x, sig), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_third_order_step_two_ways(variant):
    """The exact quadratic exponential integrator two ways: Newton divided differences with the
    phi_k integrals (DPM-Solver++(3M) at eta = 0), and UniP-3's Vandermonde solve of its order
    conditions, on an uneven history (after the warm-up, where the two differ by design)."""
    rng = np.random.default_rng(4)
    x, D0, D1, D2 = (rng.standard_normal((3, 2)) for _ in range(4))
    sig = [9.0, 4.0, 1.3, 0.5]  # sigma_{i-2}, sigma_{i-1}, sigma_i, sigma_{i+1}
    lam = [-math.log(v) for v in sig]
    a = dpmpp_multistep_step(x, sig[2], sig[3], D0, [(lam[1], D1), (lam[0], D2)], 0.0, "heun")
    b = unipc_predictor_step(x, sig[2], sig[3], [D0, D1, D2], sig[2::-1], variant)
    assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_damped_third_order_step(eta):
    """third_order="damped" in the derivative form k-diffusion writes it (D'(0) and D''/2 of the
    quadratic through the last three denoised values, scaled by h and h^2, with
    phi_2 = 1 - (1 - e^{-H}) / H and phi_3 = phi_2 / H - 1/2, H = (1 + eta) h), against the
    Newton form of dpmpp_multistep_step; and the exact third-order term is J_2 = 2 h^2 H
    phi_3(-H), twice the damped one, which the step must carry in full by default."""
    rng = np.random.default_rng(5)
    x, D0, D1, D2 = (rng.standard_normal((3, 2)) for _ in range(4))
    sig = [9.0, 4.0, 1.3, 0.5]  # sigma_{i-2}, sigma_{i-1}, sigma_i, sigma_{i+1}
    lam = [-math.log(v) for v in sig]
    hist = [(lam[1], D1), (lam[0], D2)]
    h, h1, h2 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    H = (1.0 + eta) * h
    r0, r1 = h1 / h, h2 / h
    d1_0, d1_1 = (D0 - D1) / r0, (D1 - D2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # h D'(0)
    d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 D''(0) / 2
    phi_2 = 1.0 - (1.0 - math.exp(-H)) / H
    phi_3 = phi_2 / H - 0.5
    base = (sig[3] / sig[2]) * math.exp(-eta * h) * x + (1.0 - math.exp(-H)) * D0
    damped = base + phi_2 * d1 - phi_3 * d2
    got = dpmpp_multistep_step(x, sig[2], sig[3], D0, hist, eta, "heun", "damped")
    assert_allclose(got, damped, rtol=1e-12, atol=1e-13)
    exact = base + phi_2 * d1 - 2.0 * phi_3 * d2
    assert_allclose(dpmpp_multistep_step(x, sig[2], sig[3], D0, hist, eta, "heun"), exact, rtol=1e-12, atol=1e-13)
    assert_allclose(-2.0 * phi_3 * h * h, 2.0 * h * h * H * _phi3(-H), rtol=1e-12)


def _phi3(z: float):
    """phi_3(z) = (e^z - 1 - z - z^2 / 2) / z^3 in 50-digit arithmetic."""
    with mp.workdps(50):
        w = mp.mpf(z)
        return float((mp.exp(w) - 1 - w - w * w / 2) / w**3)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_single_step_to_zero_is_the_denoiser(name):
    x = np.random.default_rng(3).standard_normal((4, 2)) * 20.0
    out = SOLVERS[name](DATA2.denoise, x, [20.0, 0.0], generator=np.random.default_rng(0))
    assert_allclose(out, DATA2.denoise(x, 20.0), rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------- exact vs Monte Carlo
@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_exact_output_matches_monte_carlo(cfg):
    """z-tests (|z| < 4.5 for the 2 means and 3 covariance entries; seed 11 + index) of n = 20000
    runs of the solver from x_T = sigma_0 z against the oracle's exact output."""
    name, opts = cfg
    sig = sigmas_karras(6, 0.05, 20.0)
    exact = DATA2.exact_solver_output(name, sig, **opts)
    n = 20_000
    seed = 11 + CONFIGS.index(cfg)
    x = np.random.default_rng(seed).standard_normal((n, 2)) * sig[0]
    y = SOLVERS[name](DATA2.denoise, x, sig, generator=np.random.default_rng(seed + 100), **opts)
    zm = (y.mean(0) - exact.mean) / np.sqrt(np.diag(exact.cov) / n)
    c = y - exact.mean
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        prod = c[:, i] * c[:, j]
        z = (prod.mean() - exact.cov[i, j]) / (prod.std() / math.sqrt(n))
        assert abs(z) < 4.5, (name, i, j, z)
    assert np.all(np.abs(zm) < 4.5), zm


def test_exact_output_monte_carlo_torch_generator():
    sig = sigmas_exponential(5, 0.05, 20.0)
    exact = DATA1.exact_solver_output(sample_dpmpp_2m_sde, sig, eta=1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40_000, 1, generator=g, dtype=torch.float64) * sig[0]
    y = sample_dpmpp_2m_sde(DATA1.denoise, x, sig, generator=torch.Generator().manual_seed(4)).numpy()[:, 0]
    n = y.size
    assert abs((y.mean() - exact.mean[0]) / math.sqrt(exact.cov[0, 0] / n)) < 4.5
    # the sample variance of a normal: se = var sqrt(2 / (n - 1))
    assert abs((y.var(ddof=1) - exact.cov[0, 0]) / (exact.cov[0, 0] * math.sqrt(2 / (n - 1)))) < 4.5


def test_exact_output_torch_backend_and_start():
    sig = sigmas_karras(7, 0.01, 157.4)
    a = DATA2.exact_solver_output("dpmpp_3m_sde", sig, backend="torch")
    b = DATA2.exact_solver_output(sample_dpmpp_3m_sde, sig)
    assert_allclose(a.mean, b.mean, rtol=1e-13)
    assert_allclose(a.cov, b.cov, rtol=1e-12)
    # a start N(0, s^2 I) with s = sigma_0 is the default; a GaussianData start works too
    c = DATA2.exact_solver_output("unipc", sig, start=float(sig[0]))
    d = DATA2.exact_solver_output("unipc", sig, start=GaussianData([0.0, 0.0], np.eye(2) * sig[0] ** 2))
    assert_allclose(c.cov, d.cov, rtol=1e-13)


def test_kl_of_dpmpp_2m_matches_k_diffusion_numbers():
    """Issue 13 quotes k-diffusion's sample_dpmpp_2m on Karras sigmas over the range of
    linear_schedule(1000), start N(0, sigma_max^2), data N(0.5, 0.1^2): exact KL 0.00155 /
    0.00132 / 3.0e-5 at NFE 10 / 20 / 50 (measured there by identifying k-diffusion's affine
    map). The same algorithm here must give the same numbers."""
    kl = [DATA1.exact_solver_output("dpmpp_2m", sigmas_karras(n, SIG_MIN, SIG_MAX)).kl(DATA1) for n in (10, 20, 50)]
    assert_allclose(kl, [0.00155, 0.00132, 3.0e-5], rtol=0.02)


# ----------------------------------------------------------------------------- order of convergence
# slope of log W2(output, q_sigma_min) against log NFE from 128 to 512 steps, from the exact
# marginal at sigma_max = 157.4 to sigma_min = 0.01 (no final 0: the flow's exact endpoint is the
# marginal N(0.5, 0.01 + sigma_min^2)); expected order, measured slopes on both ladders within 0.3.
ORDERS = [
    ("euler", {}, 1),
    ("euler_ancestral", {}, 1),
    ("heun", {}, 2),
    ("edm", {"S_churn": 10.0}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_2m_sde", {}, 2),  # the SDE family on Gaussian data (linear D): order 2 measured
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 2),
    ("dpmpp_3m_sde", {}, 2),  # eta = 1: the noise limits it to 2 (measured); see docs/samplers.md
    ("dpmpp_3m_sde", {"eta": 0.0}, 3),
    ("dpmpp_3m_sde", {"eta": 0.0, "third_order": "damped"}, 2),  # half of J_2: local error O(h^3)
    ("unipc", {"order": 1}, 2),  # UniC raises the order by one (Zhao et al. 2023)
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 2, "corrector": False}, 2),
    ("lms", {}, 4),
]


@pytest.mark.parametrize("ladder", ["exponential", "karras"])
@pytest.mark.parametrize("cfg", ORDERS, ids=lambda c: _id(c[:2]))
def test_order_of_convergence(cfg, ladder):
    name, opts, p = cfg
    smin, smax, m, v = 0.01, 157.4, 0.5, 0.01
    start = GaussianData([m], [[v + smax**2]])
    target = GaussianData([m], [[v + smin**2]])
    make = sigmas_exponential if ladder == "exponential" else sigmas_karras
    err = []
    for steps in (128, 512):
        sig = make(steps + 1, smin, smax)[:-1]
        err.append(DATA1.exact_solver_output(name, sig, start=start, **opts).wasserstein2(target))
    slope = math.log(err[0] / err[1]) / math.log(4.0)
    assert abs(slope - p) < 0.3, (name, opts, ladder, err, slope)


# ----------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_state_precision_torch(name, dtype):
    seen = []

    def denoiser(x, sigma):
        seen.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return DATA2.denoise(x, sigma).to(torch.bfloat16)  # a half-precision network output

    x = (torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    out = SOLVERS[name](denoiser, x, sigmas_karras(4, 0.1, 10.0), generator=torch.Generator().manual_seed(1))
    state = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == state
    assert all(s == (state, state, (3,)) for s in seen)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_numpy_precision_and_torch_agreement(name):
    sig = sigmas_karras(5, 0.1, 10.0)
    x = np.random.default_rng(0).standard_normal((3, 2)) * 10
    assert (
        SOLVERS[name](DATA2.denoise, x.astype(np.float16), sig, generator=np.random.default_rng(0)).dtype == np.float32
    )
    assert (
        SOLVERS[name](DATA2.denoise, x.astype(np.float32), sig, generator=np.random.default_rng(0)).dtype == np.float32
    )
    # float64 numpy and float64 torch give one result, the noise fed identically
    zs = np.random.default_rng(9).standard_normal((40, 3, 2))
    calls = {"np": 0, "t": 0}

    def ns(kind):
        def f(sigma, sigma_next):
            z = zs[calls[kind]]
            calls[kind] += 1
            return torch.from_numpy(z) if kind == "t" else z

        return f

    opts = {"noise_sampler": ns("np")} if name in STOCHASTIC else {}
    a = SOLVERS[name](DATA2.denoise, x, sig, **opts, **({"s_churn": 1.0} if name == "euler" else {}))
    opts = {"noise_sampler": ns("t")} if name in STOCHASTIC else {}
    b = SOLVERS[name](DATA2.denoise, torch.from_numpy(x), sig, **opts, **({"s_churn": 1.0} if name == "euler" else {}))
    assert a.dtype == np.float64 and b.dtype == torch.float64
    assert_allclose(b.numpy(), a, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_inputs_not_modified_and_callback(name):
    sig = sigmas_exponential(6, 0.1, 10.0)
    sig_copy = sig.copy()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 10
    x_copy = x.clone()
    info = []
    out = SOLVERS[name](DATA2.denoise, x, sig, callback=info.append, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, x_copy) and np.array_equal(sig, sig_copy)
    assert out.data_ptr() != x.data_ptr()
    assert [d["i"] for d in info] == list(range(6))
    assert all(set(d) >= {"i", "sigma", "sigma_next", "x", "denoised", "nfe"} for d in info)
    assert [d["sigma"] for d in info] == list(sig[:-1]) and [d["sigma_next"] for d in info] == list(sig[1:])
    per_step = 2 if name in ("heun", "edm") else 1
    assert [d["nfe"] for d in info] == [per_step * (i + 1) for i in range(5)] + [per_step * 5 + 1]
    assert torch.equal(info[-1]["x"], out)


def test_progress_bar_runs():
    out = sample_dpmpp_2m(DATA1.denoise, np.ones((2, 1)), sigmas_karras(3, 0.1, 1.0), progress=True)
    assert out.shape == (2, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_cuda_matches_cpu(name):
    sig = sigmas_karras(6, 0.05, 20.0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    zs = torch.randn(40, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(dev):
        k = [0]

        def ns(s, sn):
            k[0] += 1
            return zs[k[0] - 1].to(dev)

        opts = {"noise_sampler": ns} if name in STOCHASTIC else {}
        return SOLVERS[name](DATA2.denoise, x.to(dev), sig, **opts)

    out = run("cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float64
    assert_allclose(out.cpu().numpy(), run("cpu").numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_unipc_steps_integrate_the_interpolant_exactly(variant, prediction):
    """UniP-3 and UniC-3 against scipy quad: with x = x0 + sigma eps and lambda = -log sigma the
    ODE is dx/dlambda = D - x (data) or -e^{-lambda} eps (noise); its exact solution with D or eps
    replaced by the polynomial in lambda through the model values (quadratic for UniP-3 from
    three values, cubic for UniC-3 with the new one) is what the order conditions give."""
    from scipy.integrate import quad

    rng = np.random.default_rng(5)
    x, M0, M1, M2, Mn = (float(v) for v in rng.standard_normal(5))
    sig = [9.0, 4.0, 1.3, 0.5]  # sigma_{i-2}, sigma_{i-1}, sigma_i, sigma_{i+1}
    lam = [-math.log(v) for v in sig]
    vals = [M2, M1, M0, Mn]

    def exact(npts):
        poly = np.polynomial.Polynomial.fit(lam[:npts], vals[:npts], npts - 1)
        if prediction == "data":  # x_t = e^{-h} x_s + int e^{-(lam_t - l)} D(l) dl
            integ = quad(lambda l: math.exp(-(lam[3] - l)) * poly(l), lam[2], lam[3], epsabs=1e-14, epsrel=1e-13)[0]
            return math.exp(-(lam[3] - lam[2])) * x + integ
        return x - quad(lambda l: math.exp(-l) * poly(l), lam[2], lam[3], epsabs=1e-14, epsrel=1e-13)[0]

    a = unipc_predictor_step(
        np.array([x]), sig[2], sig[3], [np.array([v]) for v in (M0, M1, M2)], sig[2::-1], variant, prediction
    )
    b = unipc_corrector_step(
        np.array([x]),
        sig[2],
        sig[3],
        [np.array([v]) for v in (M0, M1, M2)],
        sig[2::-1],
        np.array([Mn]),
        variant,
        prediction,
    )
    # quad to 1e-13; the Vandermonde solve loses a few digits on this uneven history
    assert_allclose(a, exact(3), rtol=1e-10, atol=1e-12)
    assert_allclose(b, exact(4), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return DATA2.denoise(x, sigma)


SIG = sigmas_karras(4, 0.1, 10.0)
X = np.ones((2, 2))

BAD = [
    (sample_euler, np.ones((2, 2), dtype=np.int64), SIG, {}, TypeError, "x must be a floating-point array"),
    (sample_euler, torch.ones(2, 2, dtype=torch.int32), SIG, {}, TypeError, "x must be a floating-point tensor"),
    (sample_euler, [[1.0, 2.0]], SIG, {}, TypeError, "x must be a numpy array or a torch tensor"),
    (sample_euler, np.array(1.0), SIG, {}, ValueError, "batch dimension"),
    (sample_euler, np.full((2, 2), np.nan), SIG, {}, ValueError, "x must be finite"),
    (sample_heun, torch.full((2, 2), math.inf), SIG, {}, ValueError, "x must be finite"),
    (sample_heun, X, [10.0], {}, ValueError, "at least 2 levels"),
    (sample_heun, X, [[10.0, 0.0]], {}, ValueError, "1-D"),
    (sample_heun, X, [1.0, 2.0, 0.0], {}, ValueError, "strictly decreasing"),
    (sample_heun, X, [2.0, 2.0, 0.0], {}, ValueError, "strictly decreasing"),
    (sample_dpmpp_2m, X, [2.0, math.nan, 0.0], {}, ValueError, r"finite and >= 0; got sigmas\[1\] = nan"),
    (sample_dpmpp_2m, X, [2.0, 1.0, -0.5], {}, ValueError, "finite and >= 0"),
    (sample_dpmpp_2m, X, [math.inf, 1.0, 0.0], {}, ValueError, "finite and >= 0"),
    (sample_edm, X, SIG, {"S_churn": -1.0}, ValueError, r"S_churn must lie in \[0, inf\)"),
    (sample_edm, X, SIG, {"S_noise": math.nan}, ValueError, "S_noise must lie in"),
    (sample_edm, X, SIG, {"S_churn": "1"}, TypeError, "S_churn must be a real number"),
    (sample_euler, X, SIG, {"s_churn": -0.1}, ValueError, "s_churn must lie in"),
    (sample_euler_ancestral, X, SIG, {"eta": -0.5}, ValueError, "eta must lie in"),
    (sample_dpmpp_2m_sde, X, SIG, {"eta": math.inf}, ValueError, "eta must lie in"),
    (sample_dpmpp_2m_sde, X, SIG, {"solver_type": "rk4"}, ValueError, "solver_type must be one of"),
    (sample_dpmpp_3m_sde, X, SIG, {"s_noise": -1.0}, ValueError, "s_noise must lie in"),
    (sample_dpmpp_3m_sde, X, SIG, {"third_order": "half"}, ValueError, "third_order must be one of 'exact', 'damped'"),
    (sample_unipc, X, SIG, {"order": 4}, ValueError, "order must be one of 1, 2, 3; got order = 4"),
    (sample_unipc, X, SIG, {"order": 2.0}, TypeError, "order must be an integer"),
    (sample_unipc, X, SIG, {"variant": "bh3"}, ValueError, "variant must be one of"),
    (sample_lms, X, SIG, {"order": 5}, ValueError, "order must be one of 1, 2, 3, 4"),
    (sample_lms, X, SIG, {"order": 0}, ValueError, "order must be one of"),
    (sample_dpmpp_2m, X, SIG, {"generator": torch.Generator()}, TypeError, "generator is a torch.Generator"),
    (
        sample_euler_ancestral,
        torch.ones(2, 2),
        SIG,
        {"generator": np.random.default_rng()},
        TypeError,
        "numpy.random.Generator",
    ),
    (sample_euler_ancestral, X, SIG, {"noise_sampler": 3}, TypeError, "noise_sampler must be callable"),
    (sample_dpmpp_2m, X, SIG, {"order": 2}, TypeError, "unexpected keyword"),
]


@pytest.mark.parametrize("solver, x, sigmas, opts, exc, match", BAD)
def test_bad_input_before_any_model_call(solver, x, sigmas, opts, exc, match):
    D = _Counting()
    with pytest.raises(exc, match=match):
        solver(D, x, sigmas, **opts)
    assert D.calls == 0


@pytest.mark.parametrize(
    "denoiser, x, match, exc",
    [
        (lambda x, s: np.zeros((3, 2)), X, "the output of denoiser must have the shape of x", ValueError),
        (lambda x, s: torch.zeros(2, 2), X, "the output of denoiser must be a numpy array like x", TypeError),
        (
            lambda x, s: np.zeros((2, 2)),
            torch.ones(2, 2),
            "the output of denoiser must be a torch tensor like x",
            TypeError,
        ),
        (
            lambda x, s: np.zeros((2, 2), dtype=np.int64),
            X,
            "the output of denoiser must be a floating-point array",
            TypeError,
        ),
        (lambda x, s: [[1.0, 1.0], [1.0, 1.0]], X, "the output of denoiser must be a numpy array like x", TypeError),
        (None, X, "denoiser must be callable", TypeError),
        (lambda x, s: np.full(x.shape, np.nan), X, r"non-finite value \(NaN or inf\) at model call 1", ValueError),
        (lambda x, s: torch.full(x.shape, -math.inf), torch.ones(2, 2), "non-finite value", ValueError),
    ],
)
def test_bad_denoiser_output(denoiser, x, match, exc):
    with pytest.raises(exc, match=match):
        sample_dpmpp_2m(denoiser, x, SIG)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_denoiser_on_wrong_device():
    with pytest.raises(ValueError, match="the output of denoiser is on cpu"):
        sample_euler(lambda x, s: torch.zeros(2, 2), torch.ones(2, 2, device="cuda"), SIG)


BAD_INPUT = [
    (
        DATA2.exact_solver_output,
        dict(solver="rk4", sigmas=sigmas_karras(7, 0.01, 157.4)),
        ValueError,
        "solver must be one of",
    ),
    (
        DATA2.exact_solver_output,
        dict(solver="unipc", sigmas=sigmas_karras(7, 0.01, 157.4), start=-1.0),
        ValueError,
        "start must be a std > 0",
    ),
    (
        sample_euler_ancestral,
        dict(denoiser=DATA2.denoise, x=X, sigmas=SIG, noise_sampler=lambda s, sn: np.zeros((5, 2))),
        ValueError,
        "the output of noise_sampler must have the shape of x",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
