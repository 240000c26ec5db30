"""Analytic data distributions with exact marginals, scores and noise predictions, so that
samplers can be judged with no network and no Monte Carlo.

For data x_0 ~ N(mu, Sigma) (or a mixture of such) every forward process here has a
Gaussian kernel x_t = a_t x_0 + s_t z, so the marginal is exact:

    q_t = N(a_t mu, a_t^2 Sigma + s_t^2 I)                    (a mixture: componentwise)
    score(x, t) = grad log q_t(x) = -C_t^{-1} (x - a_t mu),  C_t = a_t^2 Sigma + s_t^2 I
    eps(x, t)   = E[z | x_t = x] = -s_t score(x, t)          (Tweedie; Song et al. 2021, App. B)

with (a_t, s_t^2) = (sqrt(abar_t), 1 - abar_t) for a discrete ``Schedule`` and
(m(t), s(t)^2) = ``sde.marginal_coefs(t)`` for an ``SDE``.

For Gaussian data the exact eps is linear in x, so every sampler step here (DDPM, DDIM,
Euler-Maruyama, Heun on the probability flow, the Langevin corrector with a deterministic
step) is x' = A x + b + N z with z ~ N(0, I) independent of x. The output of a whole chain
started from a Gaussian is then Gaussian, and ``GaussianData.exact_output`` /
``exact_sde_output`` propagate its mean and covariance, mean' = A mean + b,
cov' = A cov A^T + N N^T. (A, b, N) are read off the library's own step functions by
evaluating them on the basis vectors (the steps are affine), so the oracle judges exactly the
code that runs, and its error is a closed-form KL (``diffmath.gaussian.gaussian_kl``).

**Sigma space.** ``denoise(x, sigma)`` is the exact denoiser of the data perturbed by
N(0, sigma^2 I) (Karras et al. 2022, eq. 2-3), the posterior mean

    D(x; sigma) = E[x0 | x0 + sigma n = x] = mean + cov (cov + sigma^2 I)^{-1} (x - mean)

(a mixture: the responsibility-weighted component means, responsibilities from
w_k N(x; mean_k, cov_k + sigma^2 I)), in closed form at every sigma >= 0.
``GaussianData.exact_solver_output(solver, sigmas)`` is the exact output distribution of any
``diffmath.samplers`` sigma-space solver (or a peer's with the same calling convention) driven
by it: the solver is affine in its start and in the noise it injects, so running it once on
a batch of basis inputs identifies the map (module ``_solver_affine_map``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.special import erf, logsumexp

from ._array import gather_t, is_tensor, restore
from .checks import check_float, check_t, check_time
from .gaussian import gaussian_kl
from .schedules import Schedule, timesteps
from .sde import SDE

__all__ = ["GaussianData", "GaussianMixture", "expected_norm"]

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- helpers
def _check_cov(cov, D, name="cov"):
    c = np.asarray(cov, dtype=np.float64)
    if c.ndim == 0 and D == 1:
        c = c.reshape(1, 1)
    if c.shape != (D, D):
        raise ValueError(f"{name} must have shape ({D}, {D}) to match the mean; got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name} must be finite")
    if not np.allclose(c, c.T, rtol=1e-10, atol=1e-14):
        raise ValueError(f"{name} must be symmetric")
    c = 0.5 * (c + c.T)
    lam, U = np.linalg.eigh(c)
    if lam[0] <= 0:
        raise ValueError(f"{name} must be positive definite; its smallest eigenvalue is {lam[0]}")
    return c, lam, U


def _coefs(s_or_sde, t, x=None):
    """(a_t, s_t^2) float64 of t's shape (tensors on x's device for tensor x)."""
    if isinstance(s_or_sde, Schedule):
        s = s_or_sde
        t = check_t(t, s.num_timesteps, x)
        with np.errstate(divide="ignore"):
            one_m = np.exp(s.log_one_minus_alphas_cumprod)
        return gather_t(s.sqrt_alphas_cumprod, t, x), gather_t(one_m, t, x)
    if isinstance(s_or_sde, SDE):
        tt = check_time(t, x)
        a, sd = s_or_sde._marg(tt)
        return a, sd * sd
    raise TypeError(f"s_or_sde must be a diffmath Schedule or SDE; got {type(s_or_sde).__name__}")


def _as2d(x, D, name="x"):
    x = check_float(x, name)
    if x.ndim != 2 or x.shape[1] != D:
        raise ValueError(f"{name} must have shape (B, {D}); got {tuple(x.shape)}")
    return x


def _mixture_terms(x, a, s2, log_w, means, lams, Us):
    """Score and log-density of sum_k w_k N(a mu_k, a^2 Sigma_k + s2 I) at x (B, D), with
    Sigma_k = U_k diag(lam_k) U_k^T; a, s2: 0-d or (B,). Works on float64 numpy or torch."""
    tor = is_tensor(x)
    B, D = x.shape
    log: Callable[..., Any]  # torch.log or np.log, by x's kind
    if tor:
        dev = x.device

        def T(v):
            return torch.as_tensor(v, dtype=torch.float64, device=dev)

        a = T(a).reshape(-1, 1) if _nd(a) else T(a)
        s2 = T(s2).reshape(-1, 1) if _nd(s2) else T(s2)
        log = torch.log
    else:
        T = np.asarray
        a = np.asarray(a, dtype=np.float64)
        s2 = np.asarray(s2, dtype=np.float64)
        a = a.reshape(-1, 1) if a.ndim else a
        s2 = s2.reshape(-1, 1) if s2.ndim else s2
        log = np.log
    scores, logps = [], []
    for k in range(len(log_w)):
        U, lam = T(Us[k]), T(lams[k])
        c = a * a * lam + s2  # eigenvalues of C_k, (B, D) or (D,)
        y = (x - a * T(means[k])) @ U  # coordinates in the eigenbasis
        w = y / c
        scores.append(-(w @ U.T))
        logdet = log(c).sum(-1) if c.ndim > 1 else log(c).sum()
        logps.append(float(log_w[k]) - 0.5 * (D * LOG_2PI + logdet + (y * w).sum(-1)))
    if len(log_w) == 1:
        return scores[0], logps[0]
    if tor:
        L = torch.stack(logps, 0)
        lse = torch.logsumexp(L, 0)
        r = torch.exp(L - lse)
        score = sum(r[k].reshape(-1, 1) * scores[k] for k in range(len(scores)))
    else:
        Ln = np.stack(logps, 0)
        lse = logsumexp(Ln, axis=0)
        r = np.exp(Ln - lse)
        score = sum(r[k].reshape(-1, 1) * scores[k] for k in range(len(scores)))
    return score, lse


def _sigma2(sigma, x):
    """sigma^2 as float64 for the batch x (B, D): a python float, or (B, 1) of x's kind."""
    if is_tensor(sigma) or isinstance(sigma, np.ndarray):
        if is_tensor(sigma) != is_tensor(x):
            raise TypeError(f"sigma must be a float or an array of x's kind; got {type(sigma).__name__}")
        sg = _f64(sigma)
        if is_tensor(sg):
            sg = sg.to(x.device)
        if sg.ndim == 0:
            sg = sg.reshape(1)
        if sg.ndim != 1 or sg.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"sigma must be a float or have shape (B,) = ({x.shape[0]},); got shape {tuple(sg.shape)}")
        bad = ~(sg >= 0) | (sg == math.inf)
        if bool(bad.any()):
            raise ValueError(f"sigma must be finite and >= 0; got sigma = {float(sg[bad][0])}")
        return (sg * sg).reshape(-1, 1)
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a float or an array of shape (B,); got {type(sigma).__name__}")
    v = float(sigma)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"sigma must be finite and >= 0; got sigma = {v}")
    return v * v


def posterior_mean_prepared(x, s2, log_w, means, lams, Us):
    """E[x0 | x0 + sigma n = x] for x0 ~ sum_k w_k N(mu_k, U_k diag(lam_k) U_k^T), x (B, D)
    float64 (numpy or torch), s2 = sigma^2 a float or (B, 1): per component
    mu_k + U_k diag(lam_k / (lam_k + s2)) U_k^T (x - mu_k) (no cancellation at large sigma),
    weighted by the responsibilities w_k N(x; mu_k, cov_k + s2 I) / sum (logsumexp)."""
    tor = is_tensor(x)
    B, D = x.shape

    def T(v):
        return (
            torch.as_tensor(np.asarray(v, dtype=np.float64), device=x.device)
            if tor
            else np.asarray(v, dtype=np.float64)
        )

    log = torch.log if tor else np.log
    outs, logps = [], []
    for k in range(len(log_w)):
        U, lam, mu = T(Us[k]), T(lams[k]), T(means[k])
        c = lam + s2  # eigenvalues of cov_k + sigma^2 I: (D,) or (B, D)
        y = (x - mu) @ U
        outs.append(mu + (y * (lam / c)) @ U.T)
        if len(log_w) > 1:
            logdet = log(c).sum(-1) if c.ndim > 1 else log(c).sum()
            logps.append(float(log_w[k]) - 0.5 * (D * LOG_2PI + logdet + (y * y / c).sum(-1)))
    if len(log_w) == 1:
        return outs[0]
    if tor:
        L = torch.stack(logps, 0)
        r = torch.exp(L - torch.logsumexp(L, 0))
    else:
        Ln = np.stack(logps, 0)
        r = np.exp(Ln - logsumexp(Ln, axis=0))
    return sum(r[k].reshape(-1, 1) * outs[k] for k in range(len(outs)))


def solver_fn(solver):
    from .samplers.solvers import SOLVERS

    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)} or a callable; got {solver!r}")
        return SOLVERS[solver]
    if not callable(solver):
        raise TypeError(f"solver must be a solver function or a name; got {type(solver).__name__}")
    return solver


def _solver_affine_map(denoise, solver, sigmas, D, scale, backend="numpy", **options):
    """(A, b, Ns) with solver(x_T) = A x_T + b + sum_k Ns[k] z_k exactly, for a solver driven
    by an affine denoiser (exact Gaussian data) and z_k the k-th N(0, I) draw it requests from
    ``noise_sampler``. One float64 run on a batch of 1 + D + K D rows: x_T = 0; x_T = scale e_d;
    and, with x_T = 0, the noise z_k = e_d in row 1 + D + k D + d (rows never mix: every solver
    acts row by row). K is found by a first run that counts the noise requests."""
    fn = solver_fn(solver)
    takes_noise = "noise_sampler" in inspect.signature(fn).parameters
    tor = backend == "torch"
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch'; got {backend!r}")

    def arr(a):
        return torch.as_tensor(a, dtype=torch.float64) if tor else a

    def run(X, noise_rows):
        calls = [0]

        def noise_sampler(sigma, sigma_next):
            Z = np.zeros_like(X)
            if noise_rows is not None:
                k = calls[0]
                if k < noise_rows:
                    Z[1 + D + k * D : 1 + D + (k + 1) * D] = np.eye(D)
            calls[0] += 1
            return arr(Z)

        kw = dict(options)
        if takes_noise:
            kw["noise_sampler"] = noise_sampler
        out = fn(denoise, arr(X), sigmas, **kw)
        out = out.detach().cpu().numpy() if is_tensor(out) else np.asarray(out)
        return np.asarray(out, dtype=np.float64), calls[0]

    K = run(np.zeros((1, D)), None)[1] if takes_noise else 0
    X = np.zeros((1 + D + K * D, D))
    X[1 : 1 + D] = scale * np.eye(D)
    out, K2 = run(X, K)
    if K2 != K:
        raise RuntimeError(
            f"the solver drew noise {K2} times in one run and {K} in another; it must be affine and repeatable"
        )
    b = out[0]
    A = (out[1 : 1 + D] - b).T / scale
    Ns = [(out[1 + D + k * D : 1 + D + (k + 1) * D] - b).T for k in range(K)]
    return A, b, Ns


def _nd(v) -> int:
    return int(getattr(v, "ndim", 0))


def _f64(x):
    return x.to(torch.float64) if is_tensor(x) else np.asarray(x, dtype=np.float64)


def expected_norm(mean, cov) -> float:
    """E ||Y|| for Y ~ N(mean, cov), exactly: the folded-normal mean
    sigma sqrt(2/pi) exp(-mu^2 / (2 sigma^2)) + mu erf(mu / (sigma sqrt 2)) in dimension 1;
    otherwise by (trapezoid, exponentially convergent) quadrature of
    ||y|| = (1 / (2 sqrt pi)) int_0^inf (1 - e^{-s ||y||^2}) s^{-3/2} ds
    against the closed-form E e^{-s ||Y||^2} = prod_i (1 + 2 s lam_i)^{-1/2}
    exp(-s sum_i mu_i^2 / (1 + 2 s lam_i)) (mu in cov's eigenbasis); the chi mean
    sqrt(2 var) Gamma((D+1)/2) / Gamma(D/2) for zero mean and isotropic cov."""
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    if mean.ndim != 1 or not np.all(np.isfinite(mean)):
        raise ValueError(f"mean must be a finite vector; got shape {mean.shape}")
    cov, _, _ = _check_cov(cov, mean.size)
    if mean.size == 1:
        mu, sd = float(mean[0]), math.sqrt(float(cov[0, 0]))
        return sd * math.sqrt(2.0 / math.pi) * math.exp(-0.5 * (mu / sd) ** 2) + mu * float(
            erf(mu / (sd * math.sqrt(2.0)))
        )
    D = mean.size
    if not mean.any() and np.array_equal(cov, cov[0, 0] * np.eye(D)):
        # the chi distribution's mean: sqrt(2 var) Gamma((D + 1)/2) / Gamma(D/2)
        return math.sqrt(2.0 * float(cov[0, 0])) * math.exp(math.lgamma((D + 1) / 2) - math.lgamma(D / 2))
    # scale Y so that E||Y||^2 = 1: the integrand then peaks near v = 0
    c2 = float(np.trace(cov) + mean @ mean)
    lam, U = np.linalg.eigh(0.5 * (cov + cov.T) / c2)
    m2 = (U.T @ mean) ** 2 / c2

    # substitute s = e^v: int (1 - E e^{-s||Y||^2}) e^{-v/2} dv over the real line. The
    # integrand is analytic in the strip |Im v| < pi and decays like e^{-|v|/2}, so the
    # trapezoid rule with step h = 0.05 is exact to ~exp(-2 pi^2 / h) and [-90, 90] leaves
    # tails below e^{-45} (Trefethen & Weideman 2014).
    h = 0.05
    v = np.arange(-90.0, 90.0 + h / 2, h)
    s = np.exp(v)[:, None]
    q = 1.0 + 2.0 * s * lam
    log_mgf = -0.5 * np.log(q).sum(1) - s[:, 0] * (m2 / q).sum(1)
    val = h * float(np.sum(-np.expm1(log_mgf) * np.exp(-0.5 * v)))
    val *= math.sqrt(c2)
    return val / (2.0 * math.sqrt(math.pi))


def _propagate(mean, cov, step):
    """Push N(mean, cov) through an affine-Gaussian step x' = step(x, z) = A x + b + N z:
    (A, b, N) are read from ``step`` on the basis vectors (batch of D + 1 rows, then D)."""
    D = mean.shape[0]
    X = np.vstack([np.zeros((1, D)), np.eye(D)])
    out = np.asarray(step(X, np.zeros_like(X)), dtype=np.float64)
    b = out[0]
    A = (out[1:] - b).T
    outn = np.asarray(step(np.zeros((D, D)), np.eye(D)), dtype=np.float64)
    Nm = (outn - b).T
    new_cov = A @ cov @ A.T + Nm @ Nm.T
    return A @ mean + b, 0.5 * (new_cov + new_cov.T)


def _sample_normal(n, D, generator, dtype):
    from ._array import randn
    from .checks import check_generator

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got n = {n!r}")
    g = check_generator(generator)
    if isinstance(g, torch.Generator):
        return randn((n, D), g, dtype=dtype or torch.float64), g
    return randn((n, D), g, dtype=dtype or np.float64), g


# ----------------------------------------------------------------------------- Gaussian data
class GaussianData:
    """Data x_0 ~ N(mean, cov) in R^D (float64), with exact marginals, scores and eps.

    mean: (D,); cov: (D, D) symmetric positive definite (a scalar when D = 1).
    Arrays x are (B, D), numpy or torch (results in x's kind and dtype, computed in float64).
    """

    def __init__(self, mean, cov):
        m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        if m.ndim != 1:
            raise ValueError(f"mean must be 1-D, shape (D,); got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("mean must be finite")
        self.mean = m
        self.dim = m.shape[0]
        self.cov, self._lam, self._U = _check_cov(cov, self.dim)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"GaussianData(dim={self.dim}, mean={self.mean}, cov={self.cov.tolist()})"

    # -- the distribution
    def sample(self, n: int, generator=None, dtype=None):
        """n draws, shape (n, D): numpy float64 for a numpy Generator, a float64 tensor on the
        generator's device for a torch.Generator."""
        z, _ = _sample_normal(n, self.dim, generator, dtype)
        L = self._U * np.sqrt(self._lam)
        if is_tensor(z):
            Lt = torch.as_tensor(L, device=z.device, dtype=z.dtype)
            return torch.as_tensor(self.mean, device=z.device, dtype=z.dtype) + z @ Lt.T
        return self.mean + z @ L.T

    def log_prob(self, x0):
        """log N(x0; mean, cov), shape (B,)."""
        x0 = _as2d(x0, self.dim, "x0")
        return restore(_mixture_terms(_f64(x0), 1.0, 0.0, [0.0], [self.mean], [self._lam], [self._U])[1], x0)

    def kl(self, other: GaussianData) -> float:
        """KL(self || other) in nats (``diffmath.gaussian.gaussian_kl``)."""
        return float(gaussian_kl(self.mean, self.cov, other.mean, other.cov))

    # -- the forward process
    def marginal(self, s_or_sde, t) -> GaussianData:
        """The exact q_t = N(a_t mean, a_t^2 cov + s_t^2 I) for a scalar t (an index for a
        Schedule, a time in [0, 1] for an SDE)."""
        if np.ndim(t) != 0:
            raise ValueError(f"marginal needs a scalar t; got shape {np.shape(t)}")
        a, s2 = _coefs(s_or_sde, t)
        a, s2 = float(a), float(s2)
        return GaussianData(a * self.mean, a * a * self.cov + s2 * np.eye(self.dim))

    def score(self, x, t, s_or_sde):
        """grad_x log q_t(x) = -C_t^{-1} (x - a_t mean), C_t = a_t^2 cov + s_t^2 I.
        x: (B, D); t: scalar or (B,). Returns x's shape, kind and dtype."""
        x = _as2d(x, self.dim)
        a, s2 = _coefs(s_or_sde, t, x)
        return restore(_mixture_terms(_f64(x), a, s2, [0.0], [self.mean], [self._lam], [self._U])[0], x)

    def eps(self, x, t, s_or_sde):
        """E[eps | x_t = x] = -s_t score(x, t) (the ideal eps-prediction)."""
        x = _as2d(x, self.dim)
        a, s2 = _coefs(s_or_sde, t, x)
        sc = _mixture_terms(_f64(x), a, s2, [0.0], [self.mean], [self._lam], [self._U])[0]
        sd = s2**0.5
        sd = sd.reshape(-1, 1) if _nd(sd) else sd
        return restore(-sd * sc, x)

    def score_sigma(self, x, sigma):
        """Score of the data perturbed by N(0, sigma^2 I) (NCSN's noise levels):
        -(cov + sigma^2 I)^{-1} (x - mean); sigma a float or (B,) array of x's kind."""
        x = _as2d(x, self.dim)
        s = _f64(sigma) if (is_tensor(sigma) or isinstance(sigma, np.ndarray)) else float(sigma)
        return restore(_mixture_terms(_f64(x), 1.0, s * s, [0.0], [self.mean], [self._lam], [self._U])[0], x)

    def denoise(self, x, sigma):
        """The exact denoiser D(x; sigma) = E[x0 | x0 + sigma n = x] = mean + cov (cov +
        sigma^2 I)^{-1} (x - mean) (Karras et al. 2022, eq. 2-3; Tweedie: D = x + sigma^2
        ``score_sigma``), computed in the eigenbasis as mean + U diag(lam/(lam + sigma^2)) U^T
        (x - mean) without cancellation at large sigma. x: (B, D); sigma >= 0, a float or (B,)
        of x's kind (what the solvers pass). Returns x's shape, kind and dtype (float64 inside)."""
        x = _as2d(x, self.dim)
        xf = _f64(x)
        return restore(posterior_mean_prepared(xf, _sigma2(sigma, xf), [0.0], [self.mean], [self._lam], [self._U]), x)

    def wasserstein2(self, other: GaussianData) -> float:
        """W2(self, other)^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^{1/2} C1 C2^{1/2})^{1/2}) (Dowson &
        Landau 1982), the Gaussian 2-Wasserstein distance. In dimension 1 it is computed as
        sqrt(dm^2 + ds^2) with ds = (v1 - v2) / (s1 + s2), exact down to the smallest distances;
        in higher dimension the trace form loses the digits below ~sqrt(eps tr C)."""
        if not isinstance(other, GaussianData) or other.dim != self.dim:
            raise TypeError(f"other must be a GaussianData of dimension {self.dim}")
        d = self.mean - other.mean
        if self.dim == 1:
            v1, v2 = float(self.cov[0, 0]), float(other.cov[0, 0])
            ds = (v1 - v2) / (math.sqrt(v1) + math.sqrt(v2))
            return math.hypot(float(d[0]), ds)
        lam2, U2 = np.linalg.eigh(other.cov)
        r2 = (U2 * np.sqrt(np.maximum(lam2, 0.0))) @ U2.T
        M = r2 @ self.cov @ r2
        lamM = np.linalg.eigvalsh(0.5 * (M + M.T))
        tr = np.trace(self.cov) + np.trace(other.cov) - 2.0 * np.sqrt(np.maximum(lamM, 0.0)).sum()
        return math.sqrt(max(float(d @ d + tr), 0.0))

    def exact_solver_output(self, solver, sigmas, *, start=None, backend: str = "numpy", **options) -> GaussianData:
        """The exact output distribution of a sigma-space solver driven by this data's exact
        denoiser ``denoise``, from x_T ~ ``start``: a Gaussian N(A m_T + b, A C_T A^T +
        sum_k N_k N_k^T).

        ``solver``: a ``diffmath.samplers`` solver or its name ("dpmpp_2m", ...), or any
        callable with the same convention ``solver(denoiser, x, sigmas, **options)`` that draws
        all of its randomness through a ``noise_sampler(sigma, sigma_next)`` keyword
        (k-diffusion's samplers qualify). ``sigmas``: the ladder; ``options`` go to the solver.
        ``start``: None for N(0, sigmas[0]^2 I) (k-diffusion's x = sigma_0 z, the convention of
        every solver here), a float s for N(0, s^2 I) (diffusers starts a VP model's sigma
        ladder at s = sqrt(sigma_max^2 + 1)), or a GaussianData. ``backend``: run the solver
        on numpy float64 arrays or on float64 CPU tensors (for torch-only peers).

        The map (A, b, N_k) is identified exactly by one run of the solver itself on a batch
        of basis inputs (``_solver_affine_map``): the solver is affine in x_T and in its noise
        because ``denoise`` is affine in x for Gaussian data."""
        from .samplers.solvers import check_sigmas

        sig = check_sigmas(sigmas)
        D = self.dim
        if start is None or isinstance(start, numbers.Real) and not isinstance(start, bool):
            std = float(sig[0]) if start is None else float(start)
            if not (math.isfinite(std) and std > 0):
                raise ValueError(f"start must be a std > 0, a GaussianData or None; got start = {std}")
            m0, C0 = np.zeros(D), std * std * np.eye(D)
        else:
            m0, C0 = self._start(start, D)
        scale = math.sqrt(float(np.max(np.diag(C0))))
        A, b, Ns = _solver_affine_map(self.denoise, solver, sig, D, scale, backend, **options)
        cov = A @ C0 @ A.T + sum((Nk @ Nk.T for Nk in Ns), np.zeros((D, D)))
        return GaussianData(A @ m0 + b, 0.5 * (cov + cov.T))

    # -- exact sampler outputs
    def _start(self, start, D, std=1.0):
        if start is None:
            return np.zeros(D), std * std * np.eye(D)
        if not isinstance(start, GaussianData) or start.dim != D:
            raise TypeError(f"start must be a GaussianData of dimension {D}")
        return start.mean.copy(), start.cov.copy()

    def exact_output(
        self,
        s: Schedule,
        sampler: str = "ddim",
        steps=None,
        eta: float = 0.0,
        spacing: str = "leading",
        variance: str = "large",
        start=None,
    ) -> GaussianData:
        """The exact distribution of ``sample_ddim`` / ``sample_ddpm`` driven by this data's
        exact eps from x_T ~ N(0, I) (or ``start``): a Gaussian, by moment propagation
        through the affine chain (module docstring).

        ``sampler="ddim"``: ``steps`` (default T) with ``eta`` and ``spacing``.
        ``sampler="ddpm"``: ``variance``; with ``steps``, DDPM on ``s.respace(timesteps(T,
        steps, spacing))`` exactly as ``sample_ddpm``. No x0 clipping (clipping is not linear).
        """
        from .samplers.ddim import ddim_pairs, ddim_step
        from .samplers.ddpm import ddpm_step

        if not isinstance(s, Schedule):
            raise TypeError(f"s must be a Schedule; got {type(s).__name__}")
        mean, cov = self._start(start, self.dim)
        T = s.num_timesteps
        if sampler == "ddim":
            from .checks import check_steps

            steps = T if steps is None else check_steps(steps, T)
            for t, tp in ddim_pairs(T, steps, spacing):
                mean, cov = _propagate(
                    mean, cov, lambda X, Z, t=t, tp=tp: ddim_step(s, X, t, tp, self.eps(X, t, s), noise=Z, eta=eta)
                )
        elif sampler == "ddpm":
            sr = s.respace(timesteps(T, steps, spacing)) if steps is not None else s
            for t in range(sr.num_timesteps - 1, -1, -1):
                mean, cov = _propagate(
                    mean, cov, lambda X, Z, t=t: ddpm_step(sr, X, t, self.eps(X, t, sr), Z, variance=variance)
                )
        else:
            raise ValueError(f"sampler must be 'ddim' or 'ddpm'; got {sampler!r}")
        return GaussianData(mean, cov)

    def exact_sde_output(
        self,
        sde: SDE,
        sampler: str = "euler_maruyama",
        steps=None,
        eps=None,
        snr: float = 0.16,
        n_corrector_steps: int = 1,
        alpha: float = 1.0,
        denoise: bool = True,
        start=None,
    ) -> GaussianData:
        """The exact output distribution of an SDE/ODE sampler driven by the exact score, from
        the prior N(0, prior_std^2 I) (or ``start``), on ``time_grid(sde, steps, eps)``:

        "euler_maruyama"        ``sample_sde`` (last step noise-free with ``denoise``)
        "probability_flow_heun" ``sample_ode_heun``
        "probability_flow"      the exact flow of the probability-flow ODE from t = 1 to eps
                                (no discretization: x -> m_eps + C_eps^{1/2} C_1^{-1/2} (x - m_1))
        "predictor_corrector"   ``sample_pc(predictor="euler_maruyama", corrector="langevin")``
                                (default corrector_norm="batch") in the limit of a large batch: the
                                step 2 alpha (snr E||z|| / E||score||)^2 is then deterministic
                                (E over the current Gaussian, ``expected_norm``), so the
                                corrector is affine-Gaussian and the output exact.
        """
        from .checks import check_pc_args
        from .samplers.langevin import corrector_step_size, langevin_step
        from .samplers.ode import heun_step
        from .samplers.sde_solvers import euler_maruyama_step, time_grid

        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a diffmath SDE; got {type(sde).__name__}")
        snr, alpha, n_corrector_steps = check_pc_args(snr, alpha, n_corrector_steps)
        D = self.dim
        mean, cov = self._start(start, D, sde.prior_std)
        ts = time_grid(sde, steps, eps)
        n = len(ts) - 1

        def score_fn(x, t):
            return self.score(x, t, sde)

        if sampler == "probability_flow":
            a1, s1 = _coefs(sde, float(ts[0]))
            ae, se = _coefs(sde, float(ts[-1]))
            ratio = np.sqrt((ae * ae * self._lam + se) / (a1 * a1 * self._lam + s1))
            M = (self._U * ratio) @ self._U.T
            mean = ae * self.mean + M @ (mean - a1 * self.mean)
            cov = M @ cov @ M.T
            return GaussianData(mean, 0.5 * (cov + cov.T))
        if sampler == "probability_flow_heun":
            rsde = sde.reverse(score_fn, probability_flow=True)
            for k in range(n):
                dt = ts[k + 1] - ts[k]
                mean, cov = _propagate(mean, cov, lambda X, Z, k=k, dt=dt: heun_step(rsde, X, ts[k], dt))
            return GaussianData(mean, cov)
        if sampler not in ("euler_maruyama", "predictor_corrector"):
            raise ValueError(
                "sampler must be 'euler_maruyama', 'predictor_corrector', 'probability_flow_heun' or "
                f"'probability_flow'; got {sampler!r}"
            )
        rsde = sde.reverse(score_fn)
        zero_norm = expected_norm(np.zeros(D), np.eye(D))
        for k in range(n):
            t, dt = float(ts[k]), float(ts[k + 1] - ts[k])
            if sampler == "predictor_corrector":
                a, s2 = _coefs(sde, t)
                ct = float(a) ** 2 * self._lam + float(s2)
                Cinv = (self._U / ct) @ self._U.T
                for _ in range(n_corrector_steps):
                    m_s = -Cinv @ (mean - float(a) * self.mean)
                    c_s = Cinv @ cov @ Cinv
                    step = float(corrector_step_size(np.float64(expected_norm(m_s, c_s)), zero_norm, snr, alpha))
                    mean, cov = _propagate(
                        mean, cov, lambda X, Z, t=t, h=2.0 * step: langevin_step(X, score_fn(X, t), h, Z)
                    )
            last_quiet = denoise and k == n - 1
            mean, cov = _propagate(
                mean,
                cov,
                lambda X, Z, t=t, dt=dt, q=last_quiet: euler_maruyama_step(rsde, X, t, dt, None if q else Z),
            )
        return GaussianData(mean, cov)


# ----------------------------------------------------------------------------- mixtures
class GaussianMixture:
    """Data x_0 ~ sum_k w_k N(means[k], covs[k]) in R^D, with exact marginals, scores, eps.

    weights: (K,) positive, summing to 1; means: (K, D); covs: (K, D, D) SPD. The marginal
    is the mixture of the componentwise marginals, and the score the responsibility-weighted
    sum of the component scores (computed with logsumexp).
    """

    def __init__(self, weights, means, covs):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size < 1:
            raise ValueError(f"weights must be 1-D, shape (K,); got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be finite and > 0; got {w.tolist()}")
        if abs(w.sum() - 1.0) > 1e-8:
            raise ValueError(f"weights must sum to 1; got sum = {w.sum()!r}")
        self.weights = w / w.sum()
        K = w.size
        m = np.asarray(means, dtype=np.float64)
        if m.ndim == 1 and K > 1 and m.shape[0] == K:
            m = m.reshape(K, 1)
        if m.ndim != 2 or m.shape[0] != K:
            raise ValueError(f"means must have shape ({K}, D); got {m.shape}")
        self.means = m
        self.dim = D = m.shape[1]
        c = np.asarray(covs, dtype=np.float64)
        if D == 1 and c.shape == (K,):
            c = c.reshape(K, 1, 1)
        if c.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}); got {c.shape}")
        parts = [_check_cov(c[k], D, f"covs[{k}]") for k in range(K)]
        self.covs = np.stack([p[0] for p in parts])
        self._lams = [p[1] for p in parts]
        self._Us = [p[2] for p in parts]
        self._log_w = np.log(self.weights)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"GaussianMixture(K={len(self.weights)}, dim={self.dim})"

    def sample(self, n: int, generator=None, dtype=None):
        """n draws, shape (n, D), of the generator's kind (numpy float64 / torch float64)."""
        z, g = _sample_normal(n, self.dim, generator, dtype)
        K = len(self.weights)
        if is_tensor(z):
            k = torch.multinomial(torch.as_tensor(self.weights, device=z.device), n, replacement=True, generator=g)
            L = torch.as_tensor(
                np.stack([U * np.sqrt(lam) for U, lam in zip(self._Us, self._lams)]), device=z.device, dtype=z.dtype
            )
            mu = torch.as_tensor(self.means, device=z.device, dtype=z.dtype)
            return mu[k] + torch.einsum("nij,nj->ni", L[k], z)
        k = g.choice(K, size=n, p=self.weights)
        Ln = np.stack([U * np.sqrt(lam) for U, lam in zip(self._Us, self._lams)])
        return self.means[k] + np.einsum("nij,nj->ni", Ln[k], z)

    def _terms(self, x, a, s2):
        return _mixture_terms(_f64(x), a, s2, self._log_w, self.means, self._lams, self._Us)

    def log_prob(self, x0):
        """log sum_k w_k N(x0; means[k], covs[k]), shape (B,)."""
        x0 = _as2d(x0, self.dim, "x0")
        return restore(self._terms(x0, 1.0, 0.0)[1], x0)

    def marginal(self, s_or_sde, t) -> GaussianMixture:
        """The exact q_t: components N(a_t means[k], a_t^2 covs[k] + s_t^2 I), same weights."""
        if np.ndim(t) != 0:
            raise ValueError(f"marginal needs a scalar t; got shape {np.shape(t)}")
        a, s2 = _coefs(s_or_sde, t)
        a, s2 = float(a), float(s2)
        return GaussianMixture(self.weights, a * self.means, a * a * self.covs + s2 * np.eye(self.dim))

    def score(self, x, t, s_or_sde):
        """grad_x log q_t(x) (B, D), the responsibility-weighted component scores."""
        x = _as2d(x, self.dim)
        a, s2 = _coefs(s_or_sde, t, x)
        return restore(self._terms(x, a, s2)[0], x)

    def eps(self, x, t, s_or_sde):
        """E[eps | x_t = x] = -s_t score(x, t)."""
        x = _as2d(x, self.dim)
        a, s2 = _coefs(s_or_sde, t, x)
        sd = s2**0.5
        sd = sd.reshape(-1, 1) if _nd(sd) else sd
        return restore(-sd * self._terms(x, a, s2)[0], x)

    def denoise(self, x, sigma):
        """The exact denoiser D(x; sigma) = E[x0 | x0 + sigma n = x] = sum_k r_k(x) (mean_k +
        cov_k (cov_k + sigma^2 I)^{-1} (x - mean_k)), r_k the posterior responsibilities
        w_k N(x; mean_k, cov_k + sigma^2 I) / sum_j (...) (Karras et al. 2022, eq. 2-3). x: (B, D);
        sigma >= 0 a float or (B,) of x's kind. Returns x's shape, kind and dtype."""
        x = _as2d(x, self.dim)
        xf = _f64(x)
        return restore(
            posterior_mean_prepared(xf, _sigma2(sigma, xf), self._log_w, self.means, self._lams, self._Us), x
        )

    def score_sigma(self, x, sigma):
        """Score of the data perturbed by N(0, sigma^2 I); sigma a float or (B,)."""
        x = _as2d(x, self.dim)
        s = _f64(sigma) if (is_tensor(sigma) or isinstance(sigma, np.ndarray)) else float(sigma)
        return restore(self._terms(x, 1.0, s * s)[0], x)
