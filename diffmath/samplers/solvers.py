"""Few-step solvers over a sigma ladder, on one denoiser D(x; sigma) (k-diffusion's convention).

Every solver here has the signature

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, **options)

with ``x`` the start already scaled by ``sigmas[0]`` (x = sigma_0 z for a VE-style start),
``sigmas`` a strictly decreasing ladder of noise levels (``sigmas_karras`` etc.; usually
ending at 0) and ``denoiser(x, sigma)`` the posterior mean E[y | y + sigma n = x] (EDM eq. 2-3;
``diffmath.denoiser.Denoiser`` or ``GaussianData.denoise``), called with sigma an array of
shape (B,) of x's kind, device and state dtype. The probability-flow ODE they integrate is

    dx/dsigma = (x - D(x; sigma)) / sigma                                  (EDM eq. 1 and 3, sigma(t) = t)

or, in lambda = -log sigma, the semi-linear dx/dlambda = D(x; sigma) - x whose exact solution
from lambda_s to lambda_t = lambda_s + h is (Lu et al. 2022b, "DPM-Solver++", Sec. 3, with alpha = 1)

    x_t = (sigma_t / sigma_s) x_s + int_{lambda_s}^{lambda_t} e^{-(lambda_t - lambda)} D(x_lambda; sigma) dlambda.

Conventions shared by every solver:

- **Precision.** The loop state is float32, or float64 if ``x`` is float64, whatever the
  dtype of x (float16/bfloat16 start a float32 state), of the denoiser's output (upcast before
  the update) or of the noise. Coefficients are computed in float64 from the float64 ladder.
  The result has the state's dtype, x's kind and device. Inputs are never modified.
- **Last step.** A step to sigma = 0 returns the denoised sample D(x; sigma_{N-1}) (what
  every exponential integrator and Euler reach in the limit h -> inf), so a ladder of N levels
  and a final 0 costs N model evaluations for first-order and multistep solvers and 2N - 1 for
  Heun. A ladder may also end at sigma > 0: the solver then returns x at that level.
- **Randomness.** Stochastic solvers draw N(0, I) noise from ``generator`` (a
  numpy.random.Generator for numpy x, a torch.Generator on x's device for torch x; None makes
  a fresh OS-seeded one, never global state), or call ``noise_sampler(sigma, sigma_next)``
  when given, which must return an array like x (the oracle drives them with basis noise).
  Independent noise per step (k-diffusion's default for the SDE solvers is a Brownian tree;
  the distribution of the output is the same).
- **Callback.** ``callback(info)`` after each step with the dict ``i, sigma, sigma_next,
  sigma_hat (where churn raised it), x (after the step), denoised, nfe`` (cumulative
  denoiser calls).
- **Checks at the door** (before any model call): x floating (TypeError), the ladder 1-D,
  finite, >= 0, strictly decreasing, at least 2 values (ValueError), the options in range; the
  denoiser's output must have x's kind, device and shape (checked at each call).

Symbols follow the papers: lambda = -log sigma, h = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from .._array import is_tensor
from ..checks import check_generator, check_like
from ._common import progress_bar, randn

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_edm",
    "sample_euler_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_unipc",
    "sample_lms",
    "SOLVERS",
    "check_sigmas",
    "phi",
    "ancestral_step",
    "lms_coefficients",
    "churn_gamma",
    "churn_std",
    "euler_step",
    "euler_ancestral_step",
    "heun_predict",
    "heun_correct",
    "dpmpp_2m_step",
    "dpmpp_multistep_step",
    "dpmpp_sde_noise_std",
    "lms_step",
    "unipc_predictor_step",
    "unipc_corrector_step",
]


# ----------------------------------------------------------------------------- the door
def _check_x(x):
    if is_tensor(x):
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.ndim < 1:
            raise ValueError("x must have a batch dimension, shape (B, ...); got a 0-d tensor")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite (the start, already scaled by sigmas[0]); got NaN or inf")
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.detach().to(dt, copy=True)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array or a torch tensor; got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a floating-point array; got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension, shape (B, ...); got a 0-d array")
    if not np.isfinite(x).all():
        raise ValueError("x must be finite (the start, already scaled by sigmas[0]); got NaN or inf")
    return np.array(x, dtype=np.float64 if x.dtype == np.float64 else np.float32, copy=True)


def check_sigmas(sigmas) -> np.ndarray:
    """A float64 copy of the ladder, validated: 1-D, at least 2 values, finite, >= 0, strictly
    decreasing (so only the last may be 0)."""
    if is_tensor(sigmas):
        sigmas = sigmas.detach().cpu().to(torch.float64).numpy()
    try:
        sig = np.array(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"sigmas must be a 1-D sequence of floats; got {type(sigmas).__name__}") from e
    if sig.ndim != 1 or sig.size < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 levels (one step); got shape {sig.shape}")
    bad = ~np.isfinite(sig) | (sig < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"sigmas must be finite and >= 0; got sigmas[{i}] = {float(sig[i])}")
    bad = np.diff(sig) >= 0
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"sigmas must be strictly decreasing; got sigmas[{i}] = {float(sig[i])} <= sigmas[{i + 1}] = "
            f"{float(sig[i + 1])}"
        )
    return sig


def _check_nonneg(v, name: str, allow_inf: bool = False) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0; got {v!r}")
    v = float(v)
    if math.isnan(v) or v < 0 or (math.isinf(v) and not allow_inf):
        rng = "[0, inf]" if allow_inf else "[0, inf) (finite)"
        raise ValueError(f"{name} must lie in {rng}; got {name} = {v}")
    return v


def _check_choice(v, name: str, allowed):
    if v not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {name} = {v!r}")
    return v


class _Denoiser:
    """The user's denoiser, called with sigma of shape (B,), its output checked and upcast to
    the state dtype; counts the calls (NFE)."""

    def __init__(self, denoiser):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable denoiser(x, sigma); got {type(denoiser).__name__}")
        self.f = denoiser
        self.nfe = 0

    def __call__(self, x, sigma: float):
        B = x.shape[0]
        s: torch.Tensor | np.ndarray
        if is_tensor(x):
            s = torch.full((B,), float(sigma), dtype=x.dtype, device=x.device)
        else:
            s = np.full(B, float(sigma), dtype=x.dtype)
        out = self.f(x, s)
        self.nfe += 1
        if not (is_tensor(out) or isinstance(out, np.ndarray)):
            kind = "a torch tensor" if is_tensor(x) else "a numpy array"
            raise TypeError(f"the output of denoiser must be {kind} like x; got {type(out).__name__}")
        out = check_like(out, x, "the output of denoiser", "x")
        if out.dtype != x.dtype:
            out = out.to(x.dtype) if is_tensor(out) else out.astype(x.dtype)
        # one reduction per call, cheap next to a network: a NaN/inf would silently fill the samples
        finite = bool(torch.isfinite(out).all()) if is_tensor(out) else bool(np.isfinite(out).all())
        if not finite:
            raise ValueError(
                f"the denoiser returned a non-finite value (NaN or inf) at model call {self.nfe} (sigma = "
                f"{float(sigma):.6g}); "
                "stopping, the samples would be NaN (check the model's weights and inputs)"
            )
        return out


def _noise(noise_sampler, generator, x):
    """noise(sigma, sigma_next) -> N(0, I) like x in the state dtype."""
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError(
                f"noise_sampler must be callable noise_sampler(sigma, sigma_next); got {type(noise_sampler).__name__}"
            )

        def draw_user(sigma, sigma_next):
            z = noise_sampler(sigma, sigma_next)
            if not (is_tensor(z) or isinstance(z, np.ndarray)):
                raise TypeError(f"the output of noise_sampler must be an array like x; got {type(z).__name__}")
            z = check_like(z, x, "the output of noise_sampler", "x")
            return z.to(x.dtype) if is_tensor(z) else np.asarray(z, dtype=x.dtype)

        return draw_user
    g = check_generator(generator, x)

    def draw(sigma, sigma_next):
        return randn(x.shape, g, like=x)

    return draw


def _start(denoiser, x, sigmas, generator=None, noise_sampler=None, stochastic=False):
    x = _check_x(x)
    sig = check_sigmas(sigmas)
    if generator is not None and not stochastic:
        check_generator(generator, x)  # the kind must still match x
    noise = _noise(noise_sampler, generator, x) if stochastic else None
    # python floats: a numpy float64 scalar would promote a float32 state to float64
    return x, [float(v) for v in sig], _Denoiser(denoiser), noise


def _report(callback, i, sig, x, denoised, model, **extra):
    if callback is not None:
        info = {
            "i": i,
            "sigma": float(sig[i]),
            "sigma_next": float(sig[i + 1]),
            "x": x,
            "denoised": denoised,
            "nfe": model.nfe,
        }
        info.update(extra)
        callback(info)


def _steps(sig, progress, desc):
    n = len(sig) - 1
    return progress_bar(range(n), n, progress, desc)


# ----------------------------------------------------------------------------- coefficients
def phi(k: int, z: float) -> float:
    """The exponential-integrator function phi_k(z) = sum_{j >= 0} z^j / (j + k)!, i.e.
    phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z (Hochbruck & Ostermann 2010, "Exponential integrators"),
    in float64 without cancellation: the series for |z| < 2, the recurrence (which then damps
    rounding errors) from phi_1 = expm1(z)/z otherwise. For z = -h:
    int_0^h e^{-(h - u)} u^{k-1} / (k-1)! du = h^k phi_k(-h)."""
    z = float(z)
    if k == 0:
        return math.exp(z)
    if abs(z) < 2.0:
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 60):
            term *= z / (j + k)
            total += term
            if abs(term) < 1e-18 * abs(total):
                break
        return total
    val = math.expm1(z) / z
    for j in range(1, k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next (k-diffusion's
    get_ancestral_step; DDPM's posterior for eta = 1): sigma_up^2 = min(sigma_next^2,
    eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) and sigma_down^2 = sigma_next^2 -
    sigma_up^2, computed as sigma_next^2 max(0, (1 - eta^2) + eta^2 (sigma_next/sigma)^2)
    without cancellation; sigma_down = sigma_next^2 / sigma for eta = 1."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    r2 = (sigma_next / sigma) ** 2
    frac = eta * eta * (1.0 - r2)  # sigma_up^2 / sigma_next^2
    if frac >= 1.0:
        return 0.0, sigma_next
    sigma_up = sigma_next * math.sqrt(frac)
    sigma_down = sigma_next * math.sqrt((1.0 - eta * eta) + eta * eta * r2)
    return sigma_down, sigma_up


def lms_coefficients(sigmas, i: int, order: int) -> np.ndarray:
    """Adams-Bashforth weights of the linear multistep step sigma_i -> sigma_{i+1} using the
    derivatives at sigma_i, sigma_{i-1}, ..., sigma_{i-order+1}: c_j = int_{sigma_i}^{sigma_{i+1}}
    prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) dtau (the Lagrange basis
    integrated exactly, as a polynomial in u = tau - sigma_i; Hairer, Norsett & Wanner,
    Sec. III.1). Returns float64, shape (order,)."""
    sig = np.asarray(sigmas, dtype=np.float64)
    P = np.polynomial.polynomial
    nodes = np.array([sig[i - k] - sig[i] for k in range(order)])
    upper = sig[i + 1] - sig[i]
    out = np.empty(order)
    for j in range(order):
        others = np.delete(nodes, j)
        poly = P.polyfromroots(others) if others.size else np.array([1.0])
        denom = float(np.prod(nodes[j] - others)) if others.size else 1.0
        integ = P.polyint(poly)
        out[j] = float(P.polyval(upper, integ)) / denom
    return out


# ----------------------------------------------------------------------------- Euler / Heun / EDM
def churn_gamma(sigma: float, N: int, S_churn: float, S_tmin: float, S_tmax: float) -> float:
    """EDM Alg. 2, line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_tmin, S_tmax],
    else 0 (N = the number of steps, len(sigmas) - 1)."""
    if S_churn > 0 and S_tmin <= sigma <= S_tmax:
        return min(S_churn / N, math.sqrt(2.0) - 1.0)
    return 0.0


_churn = churn_gamma


def churn_std(sigma: float, gamma: float, S_noise: float = 1.0) -> float:
    """The std of the churn noise that raises sigma to sigma_hat = sigma (1 + gamma):
    S_noise sqrt(sigma_hat^2 - sigma^2) = S_noise sigma sqrt(gamma (2 + gamma)) without
    cancellation (EDM Alg. 2, lines 5-6)."""
    return S_noise * sigma * math.sqrt(gamma * (2.0 + gamma))


def euler_step(x, denoised, sigma: float, sigma_next: float):
    """One Euler step of dx/dsigma = (x - D)/sigma from sigma to sigma_next (EDM eq. 1 and 3):
    x + (sigma_next - sigma) (x - D)/sigma, in the form D + (sigma_next/sigma) (x - D) (exact D
    at sigma_next = 0). x, denoised: arrays of one kind; sigma > 0, sigma_next >= 0 floats."""
    return denoised + (sigma_next / sigma) * (x - denoised)


def euler_ancestral_step(x, denoised, sigma: float, sigma_down: float, noise=None, noise_std: float = 0.0):
    """One Euler ancestral step: the Euler step sigma -> sigma_down, then ``noise`` * noise_std
    (noise_std = s_noise sigma_up; ``ancestral_step`` gives sigma_down and sigma_up). No noise
    is added when ``noise`` is None or noise_std is 0 (k-diffusion's sample_euler_ancestral)."""
    x = euler_step(x, denoised, sigma, sigma_down)
    if noise is not None and noise_std > 0:
        x = x + noise * noise_std
    return x


def sample_euler(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
    noise_sampler=None,
):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma
    (Karras et al. 2022, eq. 1 and 3; Alg. 1 without the correction):

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i,   d_i = (x_i - D(x_i; sigma_i)) / sigma_i
                = D + (sigma_{i+1}/sigma_i) (x_i - D)   (the form computed: exact D at sigma = 0)

    First order; N model evaluations. With ``s_churn > 0`` each level in [s_tmin, s_tmax] is
    first raised to sigma_hat = sigma (1 + gamma), gamma = min(s_churn/N, sqrt 2 - 1), by adding
    noise of std sqrt(sigma_hat^2 - sigma^2) s_noise (EDM Alg. 2, lines 4-6; the noise comes
    from ``noise_sampler(sigma, sigma_hat)`` if given)."""
    s_churn = _check_nonneg(s_churn, "s_churn")
    s_tmin, s_tmax = _check_nonneg(s_tmin, "s_tmin"), _check_nonneg(s_tmax, "s_tmax", allow_inf=True)
    s_noise = _check_nonneg(s_noise, "s_noise")
    x, sig, model, noise = _start(denoiser, x, sigmas, generator, noise_sampler, stochastic=s_churn > 0)
    N = len(sig) - 1
    for i in _steps(sig, progress, "Euler"):
        s, s_next = sig[i], sig[i + 1]
        gamma = _churn(s, N, s_churn, s_tmin, s_tmax)
        s_hat = s * (1.0 + gamma)
        if gamma > 0:
            x = x + noise(s, s_hat) * churn_std(s, gamma, s_noise)  # sqrt(s_hat^2 - s^2)
        den = model(x, s_hat)
        x = euler_step(x, den, s_hat, s_next)
        _report(callback, i, sig, x, den, model, sigma_hat=s_hat)
    return x


def heun_predict(x, denoised, sigma: float, sigma_next: float):
    """The predictor of Heun's step sigma -> sigma_next > 0 (Karras et al. 2022, Alg. 1, lines
    7-8): d = (x - D(x; sigma)) / sigma and the Euler point x~ = x + (sigma_next - sigma) d.
    Returns (x~, d)."""
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d, d


def heun_correct(x, d, x_pred, denoised_pred, sigma: float, sigma_next: float):
    """The corrector of Heun's step (Karras et al. 2022, Alg. 1, lines 10-11): d' = (x~ -
    D(x~; sigma_next)) / sigma_next and the trapezoidal rule x + (sigma_next - sigma) (d + d') / 2,
    from ``heun_predict``'s x~ = ``x_pred`` and d; sigma_next > 0."""
    d2 = (x_pred - denoised_pred) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d2)


def _heun(model, x, sig, noise, callback, progress, S_churn, S_tmin, S_tmax, S_noise, desc):
    """EDM Alg. 2 (Alg. 1 when S_churn = 0)."""
    N = len(sig) - 1
    for i in _steps(sig, progress, desc):
        s, s_next = sig[i], sig[i + 1]
        gamma = _churn(s, N, S_churn, S_tmin, S_tmax)
        s_hat = s * (1.0 + gamma)
        if gamma > 0:  # lines 5-6: x_hat = x + sqrt(s_hat^2 - s^2) S_noise eps
            x = x + noise(s, s_hat) * churn_std(s, gamma, S_noise)
        den = model(x, s_hat)
        if s_next == 0:
            x = den  # line 8, the Euler step to sigma = 0
        else:
            x_e, d = heun_predict(x, den, s_hat, s_next)  # lines 7-8
            den2 = model(x_e, s_next)
            x = heun_correct(x, d, x_e, den2, s_hat, s_next)  # lines 10-11
        _report(callback, i, sig, x, den, model, sigma_hat=s_hat)
    return x


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, progress=False):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1):

        d_i = (x_i - D(x_i; sigma_i)) / sigma_i,   x~ = x_i + (sigma_{i+1} - sigma_i) d_i
        d'  = (x~ - D(x~; sigma_{i+1})) / sigma_{i+1},   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2

    and a plain Euler step to sigma = 0 (line 8). Second order; 2N - 1 model evaluations for N
    levels and a final 0. Deterministic (``generator`` is accepted for a uniform signature)."""
    x, sig, model, _ = _start(denoiser, x, sigmas, generator)
    return _heun(model, x, sig, None, callback, progress, 0.0, 0.0, math.inf, 1.0, "Heun")


def sample_edm(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    S_churn=0.0,
    S_tmin=0.0,
    S_tmax=math.inf,
    S_noise=1.0,
    noise_sampler=None,
):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): at each level sigma_i in
    [S_tmin, S_tmax] raise the noise to sigma_hat = sigma_i (1 + gamma_i), gamma_i =
    min(S_churn / N, sqrt(2) - 1), by adding N(0, (sigma_hat^2 - sigma_i^2) S_noise^2 I), then
    take the Heun step sigma_hat -> sigma_{i+1} (``sample_heun``). N = len(sigmas) - 1.
    S_churn = 0 (the default) is Alg. 1. EDM's ImageNet-64 settings: S_churn = 80, S_tmin =
    0.05, S_tmax = 50, S_noise = 1.003. Noise from ``noise_sampler(sigma_i, sigma_hat)`` if given."""
    S_churn = _check_nonneg(S_churn, "S_churn")
    S_tmin, S_tmax = _check_nonneg(S_tmin, "S_tmin"), _check_nonneg(S_tmax, "S_tmax", allow_inf=True)
    S_noise = _check_nonneg(S_noise, "S_noise")
    x, sig, model, noise = _start(denoiser, x, sigmas, generator, noise_sampler, stochastic=S_churn > 0)
    return _heun(model, x, sig, noise, callback, progress, S_churn, S_tmin, S_tmax, S_noise, "EDM")


def sample_euler_ancestral(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
):
    """Euler ancestral: an Euler step of the probability flow down to sigma_down, then fresh
    noise of std sigma_up back up to sigma_{i+1} (``ancestral_step``; k-diffusion's
    sample_euler_ancestral; with eta = 1 it is DDPM's ancestral sampling in sigma space,
    Ho et al. 2020 eq. 6-7 / Song et al. 2021 DDIM eq. 16):

        x' = D + (sigma_down / sigma_i) (x_i - D),   x_{i+1} = x' + sigma_up s_noise z

    No noise on the step to sigma = 0. eta = 0 is Euler. N model evaluations."""
    eta = _check_nonneg(eta, "eta")
    s_noise = _check_nonneg(s_noise, "s_noise")
    x, sig, model, noise = _start(denoiser, x, sigmas, generator, noise_sampler, stochastic=eta > 0)
    for i in _steps(sig, progress, "Euler ancestral"):
        s, s_next = sig[i], sig[i + 1]
        s_down, s_up = ancestral_step(s, s_next, eta)
        den = model(x, s)
        z = noise(s, s_next) if s_next > 0 and s_up > 0 else None
        x = euler_ancestral_step(x, den, s, s_down, z, s_noise * s_up)
        _report(callback, i, sig, x, den, model, sigma_down=s_down, sigma_up=s_up)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), the second-order multistep exponential
    integrator in data prediction. With lambda = -log sigma, h_i = lambda_{i+1} - lambda_i,
    r_i = h_{i-1} / h_i:

        D~ = (1 + 1/(2 r_i)) D_i - (1/(2 r_i)) D_{i-1}          (D~ = D_i at the first step)
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h_i} - 1) D~

    The step to sigma = 0 returns D_i. N model evaluations. Deterministic."""
    x, sig, model, _ = _start(denoiser, x, sigmas, generator)
    den_prev = h_prev = None
    for i in _steps(sig, progress, "DPM-Solver++(2M)"):
        s, s_next = sig[i], sig[i + 1]
        den = model(x, s)
        x = dpmpp_2m_step(x, den, s, s_next, den_prev, h_prev)
        den_prev, h_prev = den, (math.log(s / s_next) if s_next > 0 else math.inf)
        _report(callback, i, sig, x, den, model)
    return x


def dpmpp_2m_step(x, denoised, sigma: float, sigma_next: float, denoised_prev=None, h_prev: float | None = None):
    """One step sigma -> sigma_next of DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): with
    h = log(sigma / sigma_next) and r = h_prev / h,

        D~ = (1 + 1/(2 r)) D - (1/(2 r)) D_prev,   x' = (sigma_next / sigma) x - (e^{-h} - 1) D~,

    D~ = D when ``denoised_prev`` is None (the first-order step, DDIM); ``h_prev`` is the
    previous step's log(sigma_prev / sigma). The step to sigma_next = 0 returns D."""
    if sigma_next == 0:
        return denoised
    h = math.log(sigma / sigma_next)
    D = denoised
    if denoised_prev is not None:
        if h_prev is None:
            raise TypeError("h_prev (the previous step's log(sigma_prev / sigma)) must be given with denoised_prev")
        r = h_prev / h
        D = (1.0 + 0.5 / r) * denoised - (0.5 / r) * denoised_prev
    return (sigma_next / sigma) * x - math.expm1(-h) * D


def _dpmpp_sde(model, x, sig, noise, callback, progress, eta, s_noise, order, solver_type, desc, third_order="exact"):
    """The data-prediction SDE family dx = (1 + eta) (D - x) dlambda + sqrt(2 eta) sigma dW_lambda
    (its marginals are those of the diffusion for every eta; eta = 0 is the probability flow).
    Its exact solution over [lambda_i, lambda_i + h] (variation of constants; Lu et al. 2022b's
    SDE-DPM-Solver++ for eta = 1) is, with k = 1 + eta and H = k h,

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i
                  + int_0^h k e^{-k (h - u)} D(lambda_i + u) du + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z.

    D(lambda_i + u) is replaced by the polynomial through the last ``order`` denoised values (in
    Newton form: D_i + D[i, i-1] u + D[i, i-1, i-2] u (u + h_{i-1})), and the integrals
    J_n = int_0^h k e^{-k (h - u)} u^n du = n! h^n H phi_{n+1}(-H) are exact:
        J_0 = 1 - e^{-H},  J_1 = h H phi_2(-H),  J_2 = 2 h^2 H phi_3(-H).
    ``solver_type="midpoint"`` (k-diffusion's default for 2M) takes J_1 ~ J_0 h / 2."""
    hist: list[tuple[float, Any]] = []  # (lambda, denoised) of the previous levels, newest first
    for i in _steps(sig, progress, desc):
        s, s_next = sig[i], sig[i + 1]
        den = model(x, s)
        if s_next == 0:
            x = den
        else:
            x = dpmpp_multistep_step(x, s, s_next, den, hist, eta, solver_type, third_order)
            if eta > 0 and s_noise > 0:
                x = x + noise(s, s_next) * dpmpp_sde_noise_std(s, s_next, eta, s_noise)
        hist = [(-math.log(s), den)] + hist[: order - 2] if order > 1 else []
        _report(callback, i, sig, x, den, model)
    return x


def dpmpp_sde_noise_std(s: float, s_next: float, eta: float, s_noise: float = 1.0) -> float:
    """The std of the fresh noise of one step s -> s_next > 0 of the data-prediction SDE family
    (``_dpmpp_sde``): s_noise sigma_{i+1} sqrt(1 - e^{-2 eta h}), h = log(s / s_next)."""
    h = math.log(s / s_next)
    return s_noise * s_next * math.sqrt(-math.expm1(-2.0 * eta * h))


def dpmpp_multistep_step(x, s, s_next, den, hist, eta, solver_type, third_order="exact"):
    """The deterministic part of one step sigma = s -> s_next > 0 of the data-prediction
    multistep family of ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` (Lu et al. 2022b;
    eta = 0: the ODE solvers DPM-Solver++(2M) "heun" and (3M) with exact J_n, see ``_dpmpp_sde``),
    from the denoised value ``den`` at s and ``hist`` = [(lambda, D)] of the previous levels,
    lambda = -log sigma, newest first (none: first order; one: second; two: third).
    ``third_order="damped"`` carries J_2 / 2 instead of J_2 (``sample_dpmpp_3m_sde``)."""
    lam = -math.log(s)
    h = math.log(s / s_next)
    H = (1.0 + eta) * h
    J0 = -math.expm1(-H)
    x = (s_next / s) * math.exp(-eta * h) * x + J0 * den
    if hist:
        h1 = lam - hist[0][0]
        d1 = (den - hist[0][1]) / h1  # D[i, i-1]
        J1 = 0.5 * J0 * h if solver_type == "midpoint" else h * H * phi(2, -H)
        x = x + J1 * d1
        if len(hist) >= 2:
            h2 = hist[0][0] - hist[1][0]
            d2 = (d1 - (hist[0][1] - hist[1][1]) / h2) / (h1 + h2)  # D[i, i-1, i-2]
            J2 = 2.0 * h * h * H * phi(3, -H)
            if third_order == "damped":
                J2 = 0.5 * J2
            x = x + (J2 + h1 * J1) * d2
    return x


def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
    noise_sampler=None,
):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, the SDE variant; k-diffusion's
    sample_dpmpp_2m_sde): with lambda = -log sigma, h = lambda_{i+1} - lambda_i, H = (1 + eta) h,
    r = h_{i-1} / h,

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + (1 - e^{-H}) D_i
                  + c (D_i - D_{i-1}) / r + sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z,
        c = (1 - e^{-H}) / 2 ("midpoint")  or  c = 1 - (1 - e^{-H}) / H = H phi_2(-H) ("heun"),

    the second term absent at the first step and the step to sigma = 0 returning D_i. eta = 0
    with "midpoint" is ``sample_dpmpp_2m``. N model evaluations."""
    eta = _check_nonneg(eta, "eta")
    s_noise = _check_nonneg(s_noise, "s_noise")
    _check_choice(solver_type, "solver_type", ("midpoint", "heun"))
    x, sig, model, noise = _start(denoiser, x, sigmas, generator, noise_sampler, stochastic=eta > 0 and s_noise > 0)
    return _dpmpp_sde(model, x, sig, noise, callback, progress, eta, s_noise, 2, solver_type, "DPM-Solver++(2M) SDE")


def sample_dpmpp_3m_sde(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    eta=1.0,
    s_noise=1.0,
    third_order="exact",
    noise_sampler=None,
):
    """SDE-DPM-Solver++(3M): the third-order multistep member of the family of
    ``sample_dpmpp_2m_sde`` (Lu et al. 2022b; the multistep terms integrated exactly):

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + J_0 D_i + J_1 D[i, i-1]
                  + (J_2 + h_{i-1} J_1) D[i, i-1, i-2] + sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z

    with the divided differences of D in lambda and the exact integrals J_n of the quadratic
    through the last three denoised values (``_dpmpp_sde``); lower order for the first two
    steps; D_i on the step to sigma = 0. eta = 0 gives the ODE solver DPM-Solver++(3M).

    ``third_order="damped"`` carries J_2 / 2 in place of J_2, as k-diffusion's
    sample_dpmpp_3m_sde does (its phi_3 = phi_2 / H - 1/2 is half of J_2 / h^2). The local error
    is then O(h^3) and the solver converges at order 2, not 3, but the halved extrapolation is
    the more cautious one when a step is large: on the oracle's Gaussian data at 5 evaluations
    it is 2.5x closer to the exact flow than the exact third-order term (docs/samplers.md,
    "Damped third order"). The default "exact" is the order-3 solver. N model evaluations."""
    eta = _check_nonneg(eta, "eta")
    s_noise = _check_nonneg(s_noise, "s_noise")
    _check_choice(third_order, "third_order", ("exact", "damped"))
    x, sig, model, noise = _start(denoiser, x, sigmas, generator, noise_sampler, stochastic=eta > 0 and s_noise > 0)
    return _dpmpp_sde(
        model, x, sig, noise, callback, progress, eta, s_noise, 3, "heun", "DPM-Solver++(3M) SDE", third_order
    )


# ----------------------------------------------------------------------------- UniPC
def _unipc_rhs(h: float, variant: str, K: int) -> tuple[float, np.ndarray]:
    """B(h) and g_k = k! h phi_{k+1}(-h) / B(h), k = 1 .. K (UniPC's phi_p(h) / B(h) in data
    prediction, Zhao et al. 2023, Sec. 3), with B(h) = h ("bh1") or 1 - e^{-h} ("bh2")."""
    B = h if variant == "bh1" else -math.expm1(-h)
    g = np.array([math.factorial(k) * h * phi(k + 1, -h) / B for k in range(1, K + 1)])
    return B, g


def _unipc_rhs_noise(h: float, variant: str, K: int) -> tuple[float, np.ndarray]:
    """The same for noise prediction (Zhao et al. 2023, Sec. 3, eps form): B(h) = h ("bh1") or
    e^h - 1 ("bh2") and g_k = k! h phi_{k+1}(h) / B(h)."""
    B = h if variant == "bh1" else math.expm1(h)
    g = np.array([math.factorial(k) * h * phi(k + 1, h) / B for k in range(1, K + 1)])
    return B, g


def _unipc_weights(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Solve sum_m a_m r_m^{k-1} = g_k, k = 1 .. K (the Vandermonde system R_p a = phi_p / B of
    UniPC, Zhao et al. 2023, Sec. 3). For K = 1 UniPC takes a = 1/2 (its reference code and diffusers), which
    keeps the order and is exact in the limit h -> 0."""
    K = r.size
    if K == 1:
        return np.array([0.5])
    R = np.vander(r, K, increasing=True).T  # R[k-1, m] = r_m^(k-1)
    return np.linalg.solve(R, g)


def unipc_predictor_step(
    x, sigma: float, sigma_next: float, model_values, sigmas, variant: str = "bh2", prediction: str = "data"
):
    """One UniP-p step sigma -> sigma_next > 0 (Zhao et al. 2023, "UniPC", Alg. 2, B(h) form)
    from x at sigma, p = len(model_values). With lambda = -log sigma, h = lambda_next - lambda,
    r_m = (lambda_{i-m} - lambda_i) / h and D1_m = (M_{i-m} - M_i) / r_m:

      prediction="data" (M = D, the denoised values; diffusers' predict_x0=True):
        x' = (sigma_next / sigma) x + (1 - e^{-h}) D_i + B(h) sum_m a_m D1_m,  B = h | 1 - e^{-h}
      prediction="noise" (M = eps; predict_x0=False):
        x' = x - (sigma - sigma_next) eps_i - sigma_next B(h) sum_m a_m D1_m,  B = h | e^h - 1

    with a solving sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-+h) / B(h) (a = 1/2 for one
    difference). ``model_values`` = [M_i, M_{i-1}, ...] newest first, ``sigmas`` = [sigma_i,
    sigma_{i-1}, ...] their levels (sigmas[0] == sigma). x, M: arrays of one kind."""
    return _unipc_update(x, sigma, sigma_next, model_values, sigmas, variant, prediction, None)


def unipc_corrector_step(
    x, sigma: float, sigma_next: float, model_values, sigmas, model_next, variant: str = "bh2", prediction: str = "data"
):
    """The UniC-p correction (Zhao et al. 2023, Alg. 2) of the step sigma -> sigma_next > 0 taken
    from x with ``unipc_predictor_step`` and the same p = len(model_values) values, once the model
    value ``model_next`` at the predicted point is known: the predictor's formula with one more
    difference, r = 1 and D1 = M_next - M_i, and the weights solving the p order conditions
    (a = 1/2 for p = 1). It raises the order by one and costs no model call."""
    return _unipc_update(x, sigma, sigma_next, model_values, sigmas, variant, prediction, model_next)


def _unipc_update(x, s, s_next, hist, sigmas, variant, prediction, den_new):
    lam0 = -math.log(s)
    h = -math.log(s_next) - lam0
    D0 = hist[0]
    r = [(-math.log(sigmas[m]) - lam0) / h for m in range(1, len(hist))]
    D1 = [(hist[m] - D0) / r[m - 1] for m in range(1, len(hist))]
    if den_new is not None:
        r.append(1.0)
        D1.append(den_new - D0)
    if prediction == "noise":
        out = x - (s - s_next) * D0
        if not D1:
            return out
        B, g = _unipc_rhs_noise(h, variant, len(D1))
        a = _unipc_weights(np.array(r), g)
        corr = sum(float(a[m]) * D1[m] for m in range(len(D1)))
        return out - (s_next * B) * corr
    out = (s_next / s) * x + (-math.expm1(-h)) * D0
    if not D1:
        return out
    B, g = _unipc_rhs(h, variant, len(D1))
    a = _unipc_weights(np.array(r), g)
    corr = sum(float(a[m]) * D1[m] for m in range(len(D1)))
    return out + B * corr


def sample_unipc(
    denoiser,
    x,
    sigmas,
    *,
    generator=None,
    callback=None,
    progress=False,
    order=2,
    variant="bh2",
    corrector=True,
):
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework", Alg. 2-3) in
    data prediction, diffusers' default. With lambda = -log sigma, h = lambda_{i+1} - lambda_i,
    r_m = (lambda_{i-m} - lambda_i) / h and D1_m = (D_{i-m} - D_i) / r_m:

    UniP-p (predictor, uses p - 1 previous denoised values; ``unipc_predictor_step``):
        x~_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - e^{-h}) D_i + B(h) sum_m a_m D1_m
    UniC-p (corrector, after D~_{i+1} = D(x~_{i+1}; sigma_{i+1}) is evaluated for the next step,
    so it costs no extra model call; ``unipc_corrector_step``):
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - e^{-h}) D_i + B(h) (sum_m a^c_m D1_m + a^c_p (D~_{i+1} - D_i))

    with B(h) = h ("bh1") or 1 - e^{-h} ("bh2") and the weights solving the order conditions
    sum_m a_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h) (``_unipc_weights``; r = 1 for the
    corrector's new point). ``order`` p in {1, 2, 3}, lowered to i + 1 during the warm-up; the
    corrector raises the order by one. The step to sigma = 0 returns D_i (which makes the
    corrector of the last level moot: it is skipped). N model evaluations. Deterministic."""
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)):
        raise TypeError(f"order must be an integer in {{1, 2, 3}}; got {order!r}")
    _check_choice(int(order), "order", (1, 2, 3))
    _check_choice(variant, "variant", ("bh1", "bh2"))
    x, sig, model, _ = _start(denoiser, x, sigmas, generator)
    hist: list[Any] = []  # denoised values D_i, D_{i-1}, ... (newest first), at the predicted points
    x_prev = None  # x_i, the base of the last predictor step
    p_prev = 0  # the order of that predictor
    for i in _steps(sig, progress, "UniPC"):
        s, s_next = sig[i], sig[i + 1]
        den = model(x, s)
        if corrector and x_prev is not None and s_next > 0:
            x = unipc_corrector_step(x_prev, sig[i - 1], s, hist[:p_prev], sig[i - 1 :: -1], den, variant)
        hist = [den] + hist[: int(order) - 1]
        if s_next == 0:
            x_prev, x = x, den
        else:
            p = min(int(order), i + 1)
            x_prev, p_prev = x, p
            x = unipc_predictor_step(x, s, s_next, hist[:p], sig[i::-1], variant)
        _report(callback, i, sig, x, den, model)
    return x


# ----------------------------------------------------------------------------- LMS
def lms_step(x, derivatives, coefficients):
    """One linear multistep step x + sum_j c_j d_{i-j} (``sample_lms``), from the derivatives
    d_i, d_{i-1}, ... (newest first, d = (x - D)/sigma) and the weights ``lms_coefficients``."""
    for j, d in enumerate(derivatives):
        x = x + float(coefficients[j]) * d
    return x


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, order=4):
    """Linear multistep (Adams-Bashforth) on dx/dsigma = (x - D(x; sigma))/sigma (Karras et
    al. 2022, eq. 1 and 3; k-diffusion's sample_lms):

        x_{i+1} = x_i + sum_{j < q} c_j d_{i-j},   d_i = (x_i - D(x_i; sigma_i)) / sigma_i,

    q = min(order, i + 1) and c_j the exact integrals of the Lagrange basis over
    [sigma_i, sigma_{i+1}] (``lms_coefficients``; k-diffusion uses scipy quad). Order ``order``
    (1 .. 4) on a smooth ladder. N model evaluations. Deterministic."""
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)):
        raise TypeError(f"order must be an integer in [1, 4]; got {order!r}")
    _check_choice(int(order), "order", (1, 2, 3, 4))
    x, sig, model, _ = _start(denoiser, x, sigmas, generator)
    ds: list[Any] = []  # (x - D)/sigma of the previous levels, newest first
    for i in _steps(sig, progress, "LMS"):
        s = sig[i]
        den = model(x, s)
        ds = [(x - den) / s] + ds[: int(order) - 1]
        x = lms_step(x, ds, lms_coefficients(sig, i, len(ds)))
        _report(callback, i, sig, x, den, model)
    return x


#: name -> solver (the CLI's --sampler names use dashes: "euler-a" is euler_ancestral)
SOLVERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "edm": sample_edm,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "unipc": sample_unipc,
    "lms": sample_lms,
}
