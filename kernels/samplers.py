"""Fused sampler updates: DDPM, DDIM, reverse-time Euler-Maruyama and Langevin steps.

Each step is the affine update of ``_affine.py``, x' = a x + b m + c z with m the model
output (eps or score) and z ~ N(0, I) drawn in the kernel (``seed=``) or read (``noise=``):
one pass that reads x and m once and writes x' once. The per-sample coefficients (a, b, c)
are folded in float64 on the host from the schedule tables (DDIM, SDE, Langevin) or gathered
at t[b] in the kernel from float32 device copies of float64 tables (DDPM); each wrapper's
docstring gives them, and docs/kernels.md has the table of all of them. Beside each wrapper
sits its torch reference (``<step>_reference``): the verified core step of
``diffmath.samplers`` in float64, which the tests hold both paths to.

The model output m and the noise may be of another float dtype than x: a step on a float32
state with a bfloat16/float16 eps reads the half-precision values and writes float32 (the
result always has x's dtype), so a sampling loop's state keeps its precision whatever the
network's (docs/samplers.md, "Precision of the loop state").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import samplers as core
from .._array import schedule_cache
from ..checks import check_clip, check_eta, check_positive, check_schedule, check_time, check_variance
from ..samplers.ddim import ddim_coefs
from ..samplers.ddpm import ddpm_std
from ._affine import affine_update
from ._common import (
    as_float,
    check_index,
    check_like_x,
    check_noise_args,
    check_x,
    first_nonfinite,
    host_table,
    rows_of,
)
from .noise import randn

__all__ = [
    "ddpm_step",
    "ddim_step",
    "euler_maruyama_step",
    "langevin_step",
    "ddpm_step_reference",
    "ddim_step_reference",
    "euler_maruyama_step_reference",
    "langevin_step_reference",
]


def _host(t):
    """An index or time as a python scalar or a float64/int64 numpy array (B,)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return t


# ----------------------------------------------------------------------------- DDPM
def _ddpm_table(s, variance: str, clip: bool) -> np.ndarray:
    """Rows of the affine update for DDPM, float64 (k, T):
    no clip: (coef1 sra + coef2, -coef1 srm1, std); clip: (coef2, coef1, std, sra, -srm1),
    sra = sqrt(1/abar), srm1 = sqrt(1/abar - 1), std = 0 at t = 0. Built once per schedule
    (``host_table`` caches it)."""
    std = ddpm_std(s, variance)
    c1, c2 = s.posterior_mean_coef1, s.posterior_mean_coef2
    sra, srm1 = s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod
    with np.errstate(invalid="ignore", over="ignore"):
        if clip:
            return np.stack([c2, c1, std, sra, -srm1])
        return np.stack([c1 * sra + c2, -c1 * srm1, std])


def ddpm_step(s, x_t, t, eps, *, noise=None, seed=None, offset=0, variance="small", clip_x0=None):
    """One ancestral DDPM step x_t -> x_{t-1}   (DDPM Alg. 2, eq. 6-7, 11, 15):

    x0   = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clamped to [-c, c] if clip_x0 = c
    mean = posterior_mean_coef1[t] x0 + posterior_mean_coef2[t] x_t
    std  = exp(posterior_log_variance_clipped[t] / 2) ("small") or sqrt(beta_t) ("large")
    x_{t-1} = mean + std z, no noise where t = 0.

    As the fused affine update out = a x + b y' + c z (``_affine.py``), with x = x_t, y = eps,
    z = noise, coef1/coef2 = posterior_mean_coef1/2[t], std_0 = 0:

        no clip:   a = coef1 sqrt(1/abar_t) + coef2,   b = -coef1 sqrt(1/abar_t - 1),   c = std_t
        clip_x0:   y' = clamp(p x + q y, -clip_x0, clip_x0) (the clipped x0) with
                   p = sqrt(1/abar_t),   q = -sqrt(1/abar_t - 1),
                   a = coef2,   b = coef1,   c = std_t

    gathered at t[b] in the kernel (``_ddpm_table``).

    x_t, eps: tensors (B, ...); t: int or integer tensor (B,). z from ``noise`` or drawn in the
    kernel from ``seed`` (element i: draw offset + i); neither is needed when every t is 0.
    Returns x_{t-1} (contiguous, x_t's shape and dtype).
    """
    check_schedule(s)
    check_variance(variance)
    clip = check_clip(clip_x0)
    x_t = check_x(x_t, "x_t")
    eps = check_like_x(eps, x_t, "eps", "x_t")
    t, _, tmax = check_index(t, s.num_timesteps, x_t)
    noise, seed, offset = check_noise_args(noise, seed, offset, x_t, "x_t", needed=tmax > 0)
    if tmax == 0:
        noise = seed = None
    kind = ("ddpm", variance, clip is not None)

    def build(s):
        return _ddpm_table(s, variance, clip is not None)

    tab = host_table(s, kind, build)
    _check_finite_steps(s, kind, build, tmax, x_t.dtype)
    coefs = tuple(float(v) for v in tab[:, t]) if isinstance(t, int) else None
    # what=None: the table's columns up to tmax were just checked in the compute dtype
    return affine_update(x_t, eps, coefs, noise, seed, offset, clip=clip, s=s, kind=kind, build=build, t=t, what=None)


def ddpm_step_reference(s, x_t, t, eps, *, noise=None, seed=None, offset=0, variance="small", clip_x0=None):
    """The torch reference of ``ddpm_step``: the core ``diffmath.samplers.ddpm_step`` in float64
    on x_t's device, returned in x_t's dtype; z is ``noise`` or the active path's draws at
    ``(seed, offset)`` (``diffmath.kernels.randn``)."""
    z = _reference_noise(x_t, noise, seed, offset)
    out = core.ddpm_step(s, x_t.double(), t, eps.double(), z, variance=variance, clip_x0=clip_x0)
    return out.to(x_t.dtype)


def _reference_noise(x, noise, seed, offset):
    """The noise of a reference step in float64: ``noise``, the stream's draws at ``(seed,
    offset)``, or None."""
    if noise is not None:
        return noise.double()
    if seed is not None:
        return randn(x.shape, seed, offset, device=x.device).double()
    return None


def _check_finite_steps(s, kind, build, tmax: int, dtype: torch.dtype):
    """Refuse steps t <= tmax whose table coefficients are not finite in float64 (where abar_t = 0,
    a zero-terminal-SNR schedule's last step, x0 = x_t / sqrt(abar_t) - ... is undefined for
    eps-prediction) or, unless the data is float64, once cast to float32 (the kernel's and the
    float32 torch path's tables: 1/sqrt(abar_t) overflows float32 for abar_t < ~1e-77). The
    first such steps are found once per schedule and table (``first_nonfinite``)."""
    i64, i32, v = first_nonfinite(s, kind, build)
    if i64 <= tmax:
        raise ValueError(
            f"t = {i64} has alphas_cumprod[t] = {s.alphas_cumprod[i64]:.3g} (zero terminal SNR): an "
            "eps-prediction step "
            "is undefined there (1/sqrt(abar_t) = inf); start the chain at t < that step or use v-prediction"
        )
    if i32 <= tmax and dtype != torch.float64:
        raise ValueError(
            f"s at t = {i32} gives a step coefficient of {v:.4g}, which is not finite in float32 (alphas_cumprod[t] = "
            f"{s.alphas_cumprod[i32]:.3g}): the step would return inf/NaN; start the chain at t < {i32}"
        )


# ----------------------------------------------------------------------------- DDIM
def ddim_fold(s, t, t_prev, eta: float):
    """The folded DDIM coefficients (c_x, c_eps, c_z), float64 of the broadcast shape of the
    integer indices t (in [0, T)) and t_prev (in [-1, t)), with x_prev = c_x x_t + c_eps eps
    + c_z z   (DDIM eq. 12, sigma from eq. 16):

    c_x = sqrt(abar_prev) sqrt(1/abar_t),  c_eps = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) sqrt(1/abar_t - 1),
    c_z = sigma,

    that is, (a, b, c) of ``ddim_step``'s affine update,

    built from the core ``diffmath.samplers.ddim.ddim_coefs`` (which validates t, t_prev, t_prev < t
    and eta, and computes sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2) and sigma without
    cancellation). At a zero-terminal-SNR step (abar_t = 0) c_x and c_eps are not finite; the
    caller refuses those.
    """
    if type(t) is int and type(t_prev) is int and isinstance(eta, (int, float)) and not isinstance(eta, bool):
        return _ddim_fold_scalar(s, t, t_prev, float(eta))
    return _ddim_fold(s, t, t_prev, eta)


def _ddim_fold_scalar(s, t: int, t_prev: int, eta: float):
    # Schedules are immutable (frozen, read-only tables) and hash by identity, so the fold of a
    # (schedule, t, t_prev, eta) is computed and validated once and kept with the schedule: a
    # sampling loop's host overhead stays at a dictionary lookup. Errors are not cached.
    return schedule_cache(s, ("ddim_fold", t, t_prev, eta), lambda s: _ddim_fold(s, t, t_prev, eta))


def _ddim_fold(s, t, t_prev, eta):
    sqrt_abar_prev, c, sigma = ddim_coefs(s, t, t_prev, eta)
    ti = t if isinstance(t, int) else np.asarray(t, dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        c_x = sqrt_abar_prev * s.sqrt_recip_alphas_cumprod[ti]
        c_eps = c - sqrt_abar_prev * s.sqrt_recipm1_alphas_cumprod[ti]
    return c_x, c_eps, sigma


def ddim_step(s, x_t, t, t_prev, eps, *, noise=None, seed=None, offset=0, eta=0.0):
    """One DDIM step x_t -> x_{t_prev}   (DDIM eq. 12, sigma from eq. 16):

    x0     = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    sigma  = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev),

    abar_prev = alphas_cumprod[t_prev], or 1 for t_prev = -1 (the final, noiseless step).

    As the fused affine update out = a x + b y + c z (``_affine.py``), with x = x_t, y = eps,
    z = noise:

        a = sqrt(abar_prev) sqrt(1/abar_t)
        b = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) sqrt(1/abar_t - 1)
        c = sigma                                                  (p, q unused: no clip)

    x_t, eps: tensors (B, ...); t, t_prev: ints or integer tensors (B,) with t_prev < t. The
    three per-sample coefficients are folded in float64 on the host (``ddim_fold``). z from
    ``noise`` or ``seed`` is needed only when sigma > 0 (eta > 0 and t_prev >= 0).
    Returns x_{t_prev} (contiguous, x_t's shape and dtype).
    """
    check_schedule(s)
    eta = check_eta(eta)
    x_t = check_x(x_t, "x_t")
    eps = check_like_x(eps, x_t, "eps", "x_t")
    T = s.num_timesteps
    t, _, _ = check_index(t, T, x_t)
    t_prev, _, _ = check_index(t_prev, T, x_t, "t_prev", lo=-1)
    tn, tpn = _host(t), _host(t_prev)
    c_x, c_eps, sigma = ddim_fold(s, tn, tpn, eta)
    if not (np.isfinite(c_x).all() and np.isfinite(c_eps).all()):
        tb = np.broadcast_to(np.asarray(tn), np.shape(c_x))
        i = (
            int(tb.reshape(-1)[int(np.argmax(~(np.isfinite(c_x) & np.isfinite(c_eps)).reshape(-1)))])
            if np.ndim(c_x)
            else int(tn)
        )
        raise ValueError(
            f"t = {i} has alphas_cumprod[t] = {s.alphas_cumprod[i]:.3g} (zero terminal SNR): a DDIM step with "
            "eps-prediction is undefined there (1/sqrt(abar_t) = inf); start at a smaller t or use v-prediction"
        )
    needs_noise = bool(np.any(sigma > 0))
    noise, seed, offset = check_noise_args(noise, seed, offset, x_t, "x_t", needed=needs_noise)
    if not needs_noise:
        noise = seed = None
    if np.ndim(c_x) == 0:
        coefs = (float(c_x), float(c_eps), float(sigma))
    else:
        coefs = (c_x, c_eps, sigma)
    return affine_update(x_t, eps, coefs, noise, seed, offset, what="s at (t, t_prev, eta)")


def ddim_step_reference(s, x_t, t, t_prev, eps, *, noise=None, seed=None, offset=0, eta=0.0):
    """The torch reference of ``ddim_step``: the core ``diffmath.samplers.ddim_step`` in float64
    on x_t's device, returned in x_t's dtype; z is ``noise`` or the active path's draws at
    ``(seed, offset)``."""
    z = _reference_noise(x_t, noise, seed, offset)
    return core.ddim_step(s, x_t.double(), t, t_prev, eps.double(), z, eta=eta).to(x_t.dtype)


# ----------------------------------------------------------------------------- SDE and Langevin


def _sde_coefs(sde, t):
    for m in ("linear_drift_coef", "diffusion_coef"):
        if not callable(getattr(sde, m, None)):
            raise TypeError(
                f"sde must be a forward SDE with linear_drift_coef(t) and diffusion_coef(t) "
                f"(diffmath.sde.VPSDE, SubVPSDE, VESDE); got {type(sde).__name__} without {m}"
            )
    a = np.asarray(sde.linear_drift_coef(t), dtype=np.float64)
    g = np.asarray(sde.diffusion_coef(t), dtype=np.float64)
    return a, g


def euler_maruyama_step(sde, x, t, dt, score, *, noise=None, seed=None, offset=0):
    """One Euler-Maruyama step of the reverse-time SDE   (Song et al. 2021, eq. 6, App. G):

    x' = x + (f(x, t) - g(t)^2 score) dt + g(t) sqrt(-dt) z,   f(x, t) = a(t) x,   dt < 0,

    with a(t) = ``sde.linear_drift_coef(t)`` and g(t) = ``sde.diffusion_coef(t)`` of the forward
    SDE (diffmath.sde.VPSDE, SubVPSDE, VESDE) and ``score`` the model's score at (x, t).

    As the fused affine update out = a x + b y + c z (``_affine.py``), with x = x, y = score,
    z = noise, folded in float64 on the host:

        a = 1 + a(t) dt,   b = -g(t)^2 dt,   c = g(t) sqrt(-dt)       (p, q unused: no clip)

    x, score: tensors (B, ...); t: float in (0, 1] or float tensor (B,); t + dt >= 0. z from
    ``noise`` or ``seed``. Returns x' (contiguous, x's shape and dtype).
    """
    x = check_x(x, "x")
    score = check_like_x(score, x, "score", "x")
    dt = as_float(dt, "dt")
    if not dt < 0:
        raise ValueError(f"dt must be < 0 (a reverse-time step from t to t + dt); got dt = {dt}")
    t = check_time(t, x, open_left=True)  # float64 on x's device
    t = t.item() if t.ndim == 0 else t.cpu().numpy()
    if np.any(np.asarray(t) + dt < -1e-12):
        raise ValueError(f"t + dt must stay >= 0; got t = {float(np.min(t))}, dt = {dt}")
    noise, seed, offset = check_noise_args(noise, seed, offset, x, "x")
    a, g = _sde_coefs(sde, t)
    coefs: tuple[Any, ...] = (1.0 + a * dt, -g * g * dt, g * math.sqrt(-dt))  # floats or (B,) tensors
    if np.ndim(t) == 0:
        coefs = tuple(float(c) for c in coefs)
    return affine_update(
        x, score, coefs, noise, seed, offset, what="sde (its drift/diffusion coefficients at t) with dt"
    )


def euler_maruyama_step_reference(sde, x, t, dt, score, *, noise=None, seed=None, offset=0):
    """The torch reference of ``euler_maruyama_step``: the core
    ``diffmath.samplers.euler_maruyama_step`` on ``sde.reverse`` of the given score, in float64
    on x's device, returned in x's dtype; z is ``noise`` or the active path's draws at
    ``(seed, offset)``. t: a float or a float tensor (B,)."""
    score64 = score.double()
    rsde = sde.reverse(lambda x_, t_: score64)
    tt = t.double() if isinstance(t, torch.Tensor) else t
    z = _reference_noise(x, noise, seed, offset)
    return core.euler_maruyama_step(rsde, x.double(), tt, dt, z).to(x.dtype)


def _check_step_size(step_size, x):
    """A step size as the core's Langevin step takes it (``check_positive``, same errors): a
    finite float > 0, or positive values of shape (B,), returned as a float or a float64 array."""
    if isinstance(step_size, torch.Tensor):
        step_size = step_size.item() if step_size.ndim == 0 else step_size.detach().to(torch.float64).cpu().numpy()
    elif isinstance(step_size, np.ndarray):
        step_size = step_size.item() if step_size.ndim == 0 else step_size.astype(np.float64)
    if not isinstance(step_size, np.ndarray):
        return check_positive(step_size, "step_size")
    h = check_positive(step_size, "step_size", allow_array=True)
    if h.ndim != 1 or x.ndim == 0 or h.shape[0] != x.shape[0]:
        raise ValueError(f"step_size must be a float or have shape (B,) = ({rows_of(x)},); got shape {tuple(h.shape)}")
    return h


def langevin_step(x, score, step_size, *, noise=None, seed=None, offset=0):
    """One step of unadjusted Langevin dynamics   (Song & Ermon 2019, eq. 4):

    x' = x + (step_size / 2) score + sqrt(step_size) z,   z ~ N(0, I),

    As the fused affine update out = a x + b y + c z (``_affine.py``), with x = x, y = score,
    z = noise, h = step_size:

        a = 1,   b = h / 2,   c = sqrt(h)                            (p, q unused: no clip)

    x, score (grad log p at x): tensors (B, ...); step_size: float > 0 or (B,). z from
    ``noise`` or ``seed``. Returns x' (contiguous, x's shape and dtype).
    """
    x = check_x(x, "x")
    score = check_like_x(score, x, "score", "x")
    h = _check_step_size(step_size, x)
    noise, seed, offset = check_noise_args(noise, seed, offset, x, "x")
    if isinstance(h, float):
        coefs = (1.0, 0.5 * h, math.sqrt(h))
    else:
        coefs = (np.ones_like(h), 0.5 * h, np.sqrt(h))
    return affine_update(x, score, coefs, noise, seed, offset, what="step_size")


def langevin_step_reference(x, score, step_size, *, noise=None, seed=None, offset=0):
    """The torch reference of ``langevin_step``: the core ``diffmath.samplers.langevin_step`` in
    float64 on x's device, returned in x's dtype; z is ``noise`` or the active path's draws at
    ``(seed, offset)``. step_size: a float or a tensor (B,)."""
    h = step_size.double() if isinstance(step_size, torch.Tensor) else step_size
    z = _reference_noise(x, noise, seed, offset)
    return core.langevin_step(x.double(), score.double(), h, z).to(x.dtype)
