"""Noise schedules and their derived float64 tables.

Discrete time is a 0-based index ``t`` in ``[0, T)``; index ``i`` is the paper's step
``i + 1`` (guided-diffusion / diffusers convention)::

    alphas_cumprod[i] = prod_{j <= i} (1 - betas[j])          (DDPM eq. 4, abar_t)
    alphas_cumprod_prev[0] = 1

Every table is computed from the betas in float64 with cancellation-free forms:
``log(1 - beta)`` by ``log1p``, ``log abar`` as a compensated cumulative sum of logs kept as
a double-double (hi + lo) for ``abar = exp(hi)(1 + lo)`` and its powers, ``1 - abar`` by
``-expm1(log abar)`` and ``log(1 - abar)`` by ``log1mexp``. The tables are
within 1e-13 relative of a 50-digit mpmath evaluation for T <= 1000 and 1e-12 for
T <= 10,000 (asserted in tests/core/test_schedules.py). A beta of exactly 1 (zero terminal SNR)
is valid: tables that are mathematically infinite hold +-inf, and NaN never appears.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit

__all__ = [
    "Schedule",
    "linear_schedule",
    "scaled_linear_schedule",
    "cosine_schedule",
    "sigmoid_schedule",
    "betas_for_alpha_bar",
    "named_schedule",
    "rescale_zero_terminal_snr",
    "timesteps",
    "SCHEDULE_NAMES",
    "SPACINGS",
]

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------- helpers
LN2 = math.log(2.0)


def log1mexp(y):
    """log(1 - exp(y)) for y <= 0 without cancellation (Maechler 2012).

    Uses log(-expm1(y)) for y > -log 2 and log1p(-exp(y)) otherwise; -inf at y = 0 and 0 at
    y = -inf.
    """
    y = np.asarray(y, dtype=np.float64)
    out = np.empty_like(y)
    near = y > -math.log(2.0)
    with np.errstate(divide="ignore"):
        out[near] = np.log(-np.expm1(y[near]))
    out[~near] = np.log1p(-np.exp(y[~near]))
    return out


@overload
def _compensated_cumsum(v: np.ndarray, with_low: Literal[False] = False) -> np.ndarray: ...
@overload
def _compensated_cumsum(v: np.ndarray, with_low: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...
def _compensated_cumsum(v: np.ndarray, with_low: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Cumulative sum with Neumaier compensation: each partial sum within ~1 ulp of exact
    (np.cumsum's error grows with the length). Entries equal to -inf propagate as -inf.
    With ``with_low`` also returns the low parts: ``hi + lo`` (a double-double) is the
    compensated sum to ~eps^2 relative, beyond the rounding of ``hi`` to float64 (0 where hi is
    -inf)."""
    out = np.empty_like(v)
    low = np.zeros_like(v)
    s = 0.0
    c = 0.0
    for i, x in enumerate(v.tolist()):
        if x == -math.inf or s == -math.inf:
            s, c = -math.inf, 0.0
            out[i] = s
            continue
        t = s + x
        if abs(s) >= abs(x):
            c += (s - t) + x
        else:
            c += (x - t) + s
        s = t
        hi = s + c
        out[i] = hi
        low[i] = (s - hi) + c  # exact: |s| >= |c| after compensation (Fast2Sum)
    return (out, low) if with_low else out


def _check_T(T: Any, name: str = "T") -> int:
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of timesteps; got {T!r}")
    if T < 1:
        raise ValueError(f"{name} must be >= 1; got {name} = {T}")
    return int(T)


def _check_betas(betas: Any) -> np.ndarray:
    try:
        # a copy: the tables are frozen (read-only), and the caller's own array must stay writable
        b = np.array(betas, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"betas must be a 1-D array of floats; got {type(betas).__name__}") from e
    if b.ndim != 1:
        raise ValueError(f"betas must be 1-D; got shape {b.shape}")
    if b.size < 1:
        raise ValueError("betas must hold at least one value (T >= 1); got an empty array")
    bad = ~np.isfinite(b)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"betas must be finite and lie in (0, 1]; got betas[{i}] = {float(b[i])}")
    bad = (b <= 0) | (b > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"betas must lie in (0, 1]; got betas[{i}] = {float(b[i])}")
    return b


# ----------------------------------------------------------------------------- Schedule
@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion schedule and every table derived from it (float64 numpy).

    Built by ``Schedule.from_betas(betas)``. With abar_t = prod_{j<=t} (1 - beta_j):

    - ``alphas = 1 - betas``; ``alphas_cumprod = abar``; ``alphas_cumprod_prev[t] = abar_{t-1}``
      with ``abar_{-1} = 1``
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``,
      ``sqrt_recip_alphas_cumprod = 1/sqrt(abar)``, ``sqrt_recipm1_alphas_cumprod = sqrt(1/abar - 1)``
    - posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7):
      ``posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t)``,
      ``posterior_mean_coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``,
      ``posterior_mean_coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)``,
      ``posterior_log_variance_clipped`` = log posterior_variance with entry 0 replaced by
      entry 1 (Improved DDPM; for T = 1, log beta_0)
    - ``log_snr = log(abar / (1 - abar))``
    - ``timestep_map``: for a respaced schedule, the index in the original schedule of each
      step (what a model trained on the original schedule must be called with); else arange(T).
    """

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_snr: np.ndarray
    log_alphas_cumprod: np.ndarray = field(repr=False)
    timestep_map: np.ndarray = field(repr=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def __repr__(self) -> str:
        b = self.betas
        return (
            f"Schedule(T={self.num_timesteps}, betas=[{b[0]:.4g} .. {b[-1]:.4g}], "
            f"alphas_cumprod[-1]={self.alphas_cumprod[-1]:.4g})"
        )

    @classmethod
    def from_betas(cls, betas: ArrayLike, timestep_map: ArrayLike | None = None) -> Schedule:
        """Build every table from ``betas`` (1-D, finite, each in (0, 1])."""
        betas = _check_betas(betas)
        T = betas.shape[0]
        with np.errstate(divide="ignore"):
            log_alphas = np.log1p(-betas)  # -inf where beta == 1
        log_abar, log_abar_lo = _compensated_cumsum(log_alphas, with_low=True)

        def exp_log_abar(k, hi=log_abar, lo=log_abar_lo):
            # abar^k = exp(k (hi + lo)) = exp(k hi) (1 + k lo): log abar as a double-double, so
            # rounding log abar (|log abar| up to 745) to float64 costs no ulp(|log abar|)/2
            e = np.exp(k * hi)
            return np.where(np.isfinite(e), e + e * (k * lo), e)  # overflowed: inf stays inf

        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            alphas = 1.0 - betas
            abar = exp_log_abar(1.0)
            abar_prev = np.concatenate([[1.0], abar[:-1]])
            one_minus_abar = -np.expm1(log_abar)
            one_minus_abar_prev = np.concatenate([[0.0], one_minus_abar[:-1]])
            log_one_minus_abar = log1mexp(log_abar)
            far = log_abar < -LN2  # log1p(-abar) there: the double-double abar keeps it accurate
            log_one_minus_abar[far] = np.log1p(-abar[far])
            log_one_minus_abar_prev = np.concatenate([[-np.inf], log_one_minus_abar[:-1]])
            sqrt_abar = exp_log_abar(0.5)
            sqrt_one_minus_abar = np.sqrt(one_minus_abar)
            sqrt_recip_abar = exp_log_abar(-0.5)
            sqrt_recipm1_abar = sqrt_one_minus_abar * sqrt_recip_abar  # sqrt((1 - abar)/abar), no overflow
            posterior_variance = betas * one_minus_abar_prev / one_minus_abar
            log_post_var = np.log(betas) + log_one_minus_abar_prev - log_one_minus_abar
            if T > 1:
                log_post_var_clipped = np.concatenate([[log_post_var[1]], log_post_var[1:]])
            else:
                log_post_var_clipped = np.log(betas)
            coef1 = betas * np.concatenate([[1.0], sqrt_abar[:-1]]) / one_minus_abar
            coef2 = one_minus_abar_prev * np.exp(0.5 * log_alphas) / one_minus_abar
            log_snr = (log_abar - log_one_minus_abar) + log_abar_lo
            # log_snr near zero: log(abar) - log(1 - abar) cancels; -log(expm1(-log abar)) does not.
            mid = np.abs(log_snr) < 1.0
            log_snr[mid] = -np.log(np.expm1(-log_abar[mid]))
        if timestep_map is None:
            timestep_map = np.arange(T, dtype=np.int64)
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=sqrt_abar,
            sqrt_one_minus_alphas_cumprod=sqrt_one_minus_abar,
            log_one_minus_alphas_cumprod=log_one_minus_abar,
            sqrt_recip_alphas_cumprod=sqrt_recip_abar,
            sqrt_recipm1_alphas_cumprod=sqrt_recipm1_abar,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_post_var_clipped,
            posterior_mean_coef1=coef1,
            posterior_mean_coef2=coef2,
            log_snr=log_snr,
            log_alphas_cumprod=log_abar,
            timestep_map=np.array(timestep_map, dtype=np.int64, copy=True),
        )
        for name, v in tables.items():
            if name != "timestep_map" and np.isnan(v).any():  # pragma: no cover - a bug, not bad input
                raise FloatingPointError(f"table {name} holds NaN for betas {betas}")
            v.setflags(write=False)
        return cls(**tables)

    def respace(self, timesteps: ArrayLike) -> Schedule:
        """The schedule restricted to a subset of timesteps (Improved DDPM, Sec. 4).

        Keeps ``alphas_cumprod`` at the kept indices k_0 < k_1 < ... and recomputes
        ``beta'_j = 1 - abar[k_j] / abar[k_{j-1}]`` (abar[k_{-1}] = 1), in the
        cancellation-free form ``-expm1(sum of log(1 - beta) over (k_{j-1}, k_j])``.
        ``timestep_map`` of the result maps each new index to the original one.
        """
        T = self.num_timesteps
        ts = np.asarray(timesteps)
        if ts.ndim != 1 or ts.size < 1:
            raise ValueError(f"timesteps must be a non-empty 1-D collection of indices; got shape {ts.shape}")
        if not np.issubdtype(ts.dtype, np.integer):
            raise TypeError(f"timesteps must be integers; got dtype {ts.dtype}")
        kept = np.unique(ts)
        if kept[0] < 0 or kept[-1] >= T:
            bad = kept[0] if kept[0] < 0 else kept[-1]
            raise ValueError(f"timesteps must lie in [0, {T}); got {int(bad)}")
        with np.errstate(divide="ignore"):
            log_alphas = np.log1p(-self.betas)
        new_betas = np.empty(kept.size)
        prev = -1
        for j, k in enumerate(kept.tolist()):
            seg = log_alphas[prev + 1 : k + 1]
            if np.isneginf(seg).any():
                new_betas[j] = 1.0
            else:
                new_betas[j] = -math.expm1(math.fsum(seg.tolist()))
            prev = k
        return Schedule.from_betas(new_betas, timestep_map=self.timestep_map[kept])


# ----------------------------------------------------------------------------- constructors
def linear_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """betas = linspace(beta_start, beta_end, T) (DDPM, Sec. 4)."""
    T = _check_T(T)
    return Schedule.from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def scaled_linear_schedule(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:
    """betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2 (Stable Diffusion / diffusers)."""
    T = _check_T(T)
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0; got {v}")
    return Schedule.from_betas(np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2)


def cosine_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    abar(u) = f(u)/f(0), f(u) = cos((u + s)/(1 + s) * pi/2)^2, and
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).

    With c(u) = (1 - u) * pi / (2 (1 + s)) the complementary angle, f(u) = sin(c(u))^2 and
    1 - f(u2)/f(u1) = sin(c1 - c2) sin(c1 + c2) / sin(c1)^2 -- no cancellation, unlike the
    naive 1 - f(u2)/f(u1) whose relative error is ~eps/beta for small beta.
    """
    T = _check_T(T)
    if not (np.isfinite(s) and s >= 0):
        raise ValueError(f"s must be finite and >= 0; got s = {s}")
    if not (0 < max_beta <= 1):
        raise ValueError(f"max_beta must lie in (0, 1]; got max_beta = {max_beta}")
    i = np.arange(T, dtype=np.float64)
    k = math.pi / (2.0 * (1.0 + s))
    c1 = (T - i) / T * k
    diff = k / T  # c1 - c2
    csum = (2.0 * T - 2.0 * i - 1.0) / T * k  # c1 + c2 in (0, pi)
    # sin(c1 + c2) = sin(pi - (c1 + c2)); use the smaller angle to stay well-conditioned.
    comp = math.pi * (2.0 * T * s + 2.0 * i + 1.0) / (2.0 * T * (1.0 + s))
    sin_sum = np.where(csum <= math.pi / 2, np.sin(csum), np.sin(comp))
    betas = math.sin(diff) * sin_sum / np.sin(c1) ** 2
    return Schedule.from_betas(np.minimum(betas, max_beta))


def betas_for_alpha_bar(alpha_bar_fn: Callable, T: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas from a continuous abar(u), u in [0, 1] (Nichol & Dhariwal 2021, App. ...).

    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), i = 0..T-1. ``alpha_bar_fn`` is
    called once with a float64 numpy array of the T + 1 grid points and must return values
    in [0, 1], non-increasing, with abar(i/T) > 0 for i < T. Returns float64 betas. The
    precision is that of ``alpha_bar_fn``: 1 - ratio loses ~eps/beta relative where the
    ratio is near 1 (the closed-form schedules here avoid this).
    """
    T = _check_T(T)
    if not (0 < max_beta <= 1):
        raise ValueError(f"max_beta must lie in (0, 1]; got max_beta = {max_beta}")
    u = np.arange(T + 1, dtype=np.float64) / T
    ab = np.asarray(alpha_bar_fn(u), dtype=np.float64)
    if ab.shape != u.shape:
        raise ValueError(f"alpha_bar_fn must return one value per input (shape {u.shape}); got {ab.shape}")
    if not np.all(np.isfinite(ab)) or np.any(ab < 0) or np.any(ab > 1 + 1e-12):
        raise ValueError(f"alpha_bar_fn must return finite values in [0, 1]; got range [{ab.min()}, {ab.max()}]")
    if np.any(ab[:-1] <= 0):
        i = int(np.argmax(ab[:-1] <= 0))
        raise ValueError(f"alpha_bar_fn must be > 0 before u = 1; got abar({u[i]}) = {ab[i]}")
    betas = np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)
    if np.any(betas <= 0):
        i = int(np.argmax(betas <= 0))
        raise ValueError(
            f"alpha_bar_fn must be strictly decreasing (betas in (0, 1]); got abar({u[i + 1]}) >= abar({u[i]})"
        )
    return betas


def sigmoid_schedule(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> Schedule:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling", Alg. 1).

    abar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau))
              / (sigmoid(end/tau) - sigmoid(start/tau)),
    normalised so abar(0) = 1 (abar(1) = 0, so the last beta is clipped to 0.999), turned
    into betas by ``betas_for_alpha_bar``.
    """
    T = _check_T(T)
    if not (np.isfinite(start) and np.isfinite(end) and end > start):
        raise ValueError(f"sigmoid schedule needs finite start < end; got start = {start}, end = {end}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0; got tau = {tau}")
    v_start, v_end = expit(start / tau), expit(end / tau)

    def alpha_bar(u):
        v = expit((u * (end - start) + start) / tau)
        return np.clip((v_end - v) / (v_end - v_start), 0.0, 1.0)

    return Schedule.from_betas(betas_for_alpha_bar(alpha_bar, T))


def named_schedule(name: str, T: int) -> Schedule:
    """A schedule by name, with guided-diffusion's defaults.

    ``"linear"``: linear from 1e-4 * 1000/T to 0.02 * 1000/T (guided-diffusion scales both
    ends by 1000/T so any T gives the same curve; T >= 20 or the last beta exceeds 1).
    ``"cosine"``, ``"scaled_linear"``, ``"sigmoid"``: the constructors above with defaults.
    """
    T = _check_T(T)
    if name == "linear":
        if T < 20:
            raise ValueError(f"named_schedule('linear', T) needs T >= 20 (betas are scaled by 1000/T); got T = {T}")
        scale = 1000.0 / T
        return linear_schedule(T, scale * 1e-4, scale * 0.02)
    if name == "cosine":
        return cosine_schedule(T)
    if name == "scaled_linear":
        return scaled_linear_schedule(T)
    if name == "sigmoid":
        return sigmoid_schedule(T)
    raise ValueError(f"unknown schedule name {name!r}; valid names are {', '.join(SCHEDULE_NAMES)}")


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Rescale so the last step has zero SNR (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Alg. 1).

    sqrt(abar'_t) = (sqrt(abar_t) - sqrt(abar_{T-1})) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_{T-1})),
    so abar'_0 = abar_0 and abar'_{T-1} = 0 (beta'_{T-1} = 1). For t >= 1, with
    r = sqrt(alpha'_t) and S_t = sum_{j >= t} log(1 - beta_j), one finds without cancellation
    1 - r = -expm1(log(alpha_t)/2) / -expm1(S_t/2) and beta'_t = (1 - r)(1 + r).
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule; got {type(schedule).__name__}")
    T = schedule.num_timesteps
    if T < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs T >= 2 steps; got T = {T}")
    with np.errstate(divide="ignore"):
        log_alphas = np.log1p(-schedule.betas)
    # suffix sums S_t = sum_{j >= t} log alpha_j, compensated
    S = _compensated_cumsum(log_alphas[::-1].copy())[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        one_minus_r = -np.expm1(0.5 * log_alphas[1:]) / -np.expm1(0.5 * S[1:])
    one_minus_r = np.clip(one_minus_r, 0.0, 1.0)
    betas = np.empty(T)
    betas[0] = schedule.betas[0]
    betas[1:] = one_minus_r * (2.0 - one_minus_r)
    betas[-1] = 1.0
    return Schedule.from_betas(betas, timestep_map=schedule.timestep_map)


def timesteps(T: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """``num_steps`` descending timestep indices in [0, T) (diffusers semantics, steps_offset = 0).

    leading  = arange(S) * (T // S)
    trailing = round(arange(T, 0, -T/S)) - 1
    linspace = round(linspace(0, T - 1, S))
    computed with diffusers' own expressions (``DDIMScheduler.set_timesteps``), so the indices
    are bit-identical to diffusers' (np.round rounds half to even): trailing is
    ``np.round(np.arange(T, 0, -T/S)).astype(int64) - 1``, not T - i*(T/S), which rounds some
    half-way cases the other way (T = 999, S = 50: 498 at index 25, not 499). Where the float
    step T/S makes ``arange`` yield S + 1 values (T = 999, S = 13), diffusers returns S + 1
    timesteps ending in -1; the first S are kept here. A sampler steps from each element to
    the next and from the last to t_prev = -1.
    """
    T = _check_T(T)
    if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an integer; got {num_steps!r}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, T] = [1, {T}]; got num_steps = {num_steps}")
    S = int(num_steps)
    if spacing == "leading":
        ts = (np.arange(S, dtype=np.int64) * (T // S))[::-1]
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64)[:S] - 1  # already descending
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, S)).astype(np.int64)[::-1]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings are {', '.join(SPACINGS)}")
    return np.ascontiguousarray(ts)
