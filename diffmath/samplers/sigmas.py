"""Noise-level ladders for the sigma-space solvers (k-diffusion's convention).

A ladder is a float64 numpy array sigma_0 > sigma_1 > ... > sigma_{n-1} > 0 followed by a final
sigma_n = 0: a solver steps from each level to the next, and the last step lands on the data
(sigma = 0). With n levels a first-order solver makes n model evaluations. In EDM's notation
x = y + sigma n, and a VP model's x_t = x / sqrt(1 + sigma^2) (Karras et al. 2022, Sec. 2).

    karras          sigma_i = (sigma_max^{1/rho} + i/(n-1) (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho
                                                                      (Karras et al. 2022, eq. 5)
    exponential     log sigma uniform on [log sigma_min, log sigma_max] (lambda = -log sigma uniform)
    polyexponential log sigma_i = log sigma_min + (1 - i/(n-1))^rho (log sigma_max - log sigma_min)
    beta            sigma_i = sigma_min + F^{-1}(1 - i/(n-1)) (sigma_max - sigma_min), F the Beta(a, b) CDF
                                                                      (Lee et al. 2024, "Beta sampling is all you need")
    vp              sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t uniform on [1, eps_s]
                                                                      (Karras et al. 2022, Table 1)
    from_schedule   sigma_t = sqrt((1 - abar_t) / abar_t) at ``timesteps(T, steps, spacing)``

With n = 1 every ladder is [sigma_max, 0] (k-diffusion's linspace(0, 1, 1) = [0]).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..checks import check_schedule
from ..schedules import timesteps

__all__ = [
    "sigmas_karras",
    "sigmas_exponential",
    "sigmas_polyexponential",
    "sigmas_vp",
    "sigmas_beta",
    "sigmas_from_schedule",
    "append_zero",
]


def _check_n(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer number of noise levels; got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (noise levels before the final 0); got n = {int(n)}")
    return int(n)


def _check_real(v, name: str, lo: float = 0.0, open_lo: bool = True) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {v!r}")
    v = float(v)
    ok = math.isfinite(v) and (v > lo if open_lo else v >= lo)
    if not ok:
        rng = f"> {lo:g}" if open_lo else f">= {lo:g}"
        raise ValueError(f"{name} must be finite and {rng}; got {name} = {v}")
    return v


def _check_range(sigma_min, sigma_max):
    smin = _check_real(sigma_min, "sigma_min")
    smax = _check_real(sigma_max, "sigma_max")
    if not smin < smax:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min = {smin}, sigma_max = {smax}")
    return smin, smax


def _ramp(n: int) -> np.ndarray:
    """i / (n - 1) for i = 0 .. n-1 (just [0] for n = 1)."""
    return np.linspace(0.0, 1.0, n)


def append_zero(sigmas) -> np.ndarray:
    """The ladder ``sigmas`` (float64) with a final sigma = 0 appended."""
    return np.concatenate([np.asarray(sigmas, dtype=np.float64), [0.0]])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: n levels from sigma_max down to sigma_min, equally spaced
    in sigma^{1/rho}, then 0. rho = 7 (EDM's choice) packs the steps near sigma_min; rho = 1 is
    uniform in sigma. Returns float64, shape (n + 1,)."""
    n = _check_n(n)
    smin, smax = _check_range(sigma_min, sigma_max)
    rho = _check_real(rho, "rho")
    lo, hi = smin ** (1.0 / rho), smax ** (1.0 / rho)
    sig = (hi + _ramp(n) * (lo - hi)) ** rho
    sig[0] = smax  # exact endpoints (the power can round them by an ulp)
    if n > 1:
        sig[-1] = smin
    return append_zero(sig)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n levels uniform in log sigma (so uniform steps h in lambda = -log sigma, the natural
    ladder of the exponential integrators DPM-Solver++ and UniPC), then 0. float64, (n + 1,)."""
    n = _check_n(n)
    smin, smax = _check_range(sigma_min, sigma_max)
    sig = np.exp(np.linspace(math.log(smax), math.log(smin), n))
    sig[0] = smax
    if n > 1:
        sig[-1] = smin
    return append_zero(sig)


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """log sigma_i = log sigma_min + (1 - i/(n-1))^rho (log sigma_max - log sigma_min), then 0
    (k-diffusion's polyexponential ladder; rho = 1 is the exponential ladder, rho > 1 spends
    more steps at low noise). float64, (n + 1,)."""
    n = _check_n(n)
    smin, smax = _check_range(sigma_min, sigma_max)
    rho = _check_real(rho, "rho")
    ramp = (1.0 - _ramp(n)) ** rho
    sig = np.exp(math.log(smin) + ramp * (math.log(smax) - math.log(smin)))
    sig[0] = smax
    if n > 1:
        sig[-1] = smin
    return append_zero(sig)


def sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """n levels sigma_i = sigma_min + F^{-1}(1 - i/(n-1); alpha, beta) (sigma_max - sigma_min), F the
    CDF of the Beta(alpha, beta) distribution (Lee et al. 2024, "Beta sampling is all you need",
    Sec. 3; alpha = beta = 0.6 spends more steps at both ends), then 0. float64, (n + 1,)."""
    from scipy.stats import beta as beta_dist

    n = _check_n(n)
    smin, smax = _check_range(sigma_min, sigma_max)
    alpha = _check_real(alpha, "alpha")
    beta = _check_real(beta, "beta")
    ppf = beta_dist.ppf(1.0 - _ramp(n), alpha, beta)
    sig = smin + ppf * (smax - smin)
    sig[0] = smax
    if n > 1:
        sig[-1] = smin
    return append_zero(sig)


def sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> np.ndarray:
    """The continuous VP ladder (Karras et al. 2022, Table 1; Song et al. 2021):
    sigma(t) = sqrt(expm1(beta_d t^2 / 2 + beta_min t)) at n times t uniform from 1 down to eps_s,
    then 0. beta_d = beta_max - beta_min of ``diffmath.sde.VPSDE``. float64, (n + 1,)."""
    n = _check_n(n)
    beta_d = _check_real(beta_d, "beta_d", open_lo=False)
    beta_min = _check_real(beta_min, "beta_min", open_lo=False)
    if beta_d == 0 and beta_min == 0:
        raise ValueError("beta_d and beta_min cannot both be 0 (every sigma would be 0)")
    eps_s = _check_real(eps_s, "eps_s")
    if not eps_s < 1:
        raise ValueError(f"eps_s must lie in (0, 1) (the last time of the ladder); got eps_s = {eps_s}")
    t = np.linspace(1.0, eps_s, n)
    return append_zero(np.sqrt(np.expm1(0.5 * beta_d * t * t + beta_min * t)))


def sigmas_from_schedule(s, steps: int, spacing: str = "leading") -> np.ndarray:
    """The discrete schedule's own noise levels sigma_t = sqrt((1 - abar_t)/abar_t) (the table
    ``s.sqrt_recipm1_alphas_cumprod``) at ``timesteps(T, steps, spacing)`` (leading, trailing
    or linspace, diffusers semantics), descending, then 0. A denoiser built on ``s`` gets these
    levels' exact integer timesteps. float64, (steps + 1,)."""
    s = check_schedule(s)
    ts = timesteps(s.num_timesteps, steps, spacing)
    sig = np.asarray(s.sqrt_recipm1_alphas_cumprod, dtype=np.float64)[ts]
    if not np.all(np.isfinite(sig)):
        raise ValueError(
            "sigmas_from_schedule: the schedule has alphas_cumprod = 0 at a requested timestep (zero terminal SNR), "
            "where sigma is infinite; sigma-space solvers need finite sigmas"
        )
    return append_zero(sig)
