"""Fused sampler updates: DDPM, DDIM, reverse-time Euler-Maruyama and Langevin steps.

Each step is the affine update of ``_affine.py``, x' = a x + b m + c z with m the model
output (eps or score) and z ~ N(0, I) drawn in the kernel (``seed=``) or read (``noise=``):
one pass that reads x and m once and writes x' once. The per-sample coefficients (a, b, c)
are folded in float64 on the host from the schedule tables (DDIM, SDE, Langevin) or gathered
at t[b] in the kernel from float32 device copies of float64 tables (DDPM).
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from ..samplers._common import check_eta
from ..samplers.ddim import ddim_coefs
from ..samplers.ddpm import _check_clip, _check_variance, ddpm_std
from ._affine import affine_kernel, launch_affine, torch_affine
from ._common import (
    as_float,
    check_index,
    check_like_x,
    check_noise_args,
    check_schedule,
    check_x,
    device_table,
    f32,
    gather_rows,
    host_table,
    per_sample,
    rows_of,
    to_dtype,
    torch_normal,
    use_triton,
)

__all__ = ["ddpm_step", "ddim_step", "euler_maruyama_step", "langevin_step"]


# ----------------------------------------------------------------------------- shared launch
def _check_coefs(coefs, dtype: torch.dtype, what: str):
    """Refuse per-sample coefficients that are not finite once cast to ``dtype`` (float32 for
    the kernels and float16/bfloat16/float32 data, float64 on the float64 torch path): an
    oversized step size or SDE coefficient would otherwise turn the output into inf/NaN."""
    npd = np.float64 if dtype == torch.float64 else np.float32
    for c in coefs:
        if isinstance(c, float):
            if math.isfinite(c) and (npd is np.float64 or math.isfinite(f32(c))):
                continue
            v = c
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                bad = ~np.isfinite(np.asarray(c, dtype=np.float64).astype(npd))
            if not bad.any():
                continue
            v = float(np.asarray(c, dtype=np.float64)[bad].reshape(-1)[0])
        raise ValueError(
            f"{what} gives a step coefficient of {v:.4g}, which is not finite in {np.dtype(npd).name}: "
            "the step would return inf/NaN"
        )


def _step(x, y, coefs, noise, seed, offset, *, clip=None, s=None, kind=None, build=None, t=None, what="the coefficients"):
    """out = a x + b y' + c z with (a, b, c[, p, q]) = ``coefs`` (python floats or float64 (B,)
    arrays), or gathered at tensor ``t`` from the table ``build(s)`` cached under ``kind``.
    Host-folded coefficients must be finite after the cast to the compute dtype (ValueError
    naming ``what``, the arguments they come from)."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    B = rows_of(x)
    tabled = t is not None and not isinstance(t, int)
    scalar = not tabled and all(isinstance(c, float) for c in coefs)
    triton_path = use_triton(x, affine_kernel)
    if not tabled:
        _check_coefs(coefs, torch.float64 if (x.dtype == torch.float64 and not triton_path) else torch.float32, what)
    if triton_path:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        kw = dict(x=x.contiguous(), y=y.contiguous(), z=noise.contiguous() if noise is not None else None,
                  clip=clip, seed=seed, offset=offset, rows=B)  # fmt: skip
        if tabled:
            return launch_affine(out, coef=device_table(s, kind, x.device, torch.float32, build), t=t, **kw)
        if scalar:
            sc = tuple(f32(c, what) for c in coefs) + (0.0,) * (5 - len(coefs))
            return launch_affine(out, scalars=sc, **kw)
        arr = np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), (B,)) for c in coefs]).astype(np.float32)
        return launch_affine(out, coef=torch.from_numpy(arr).to(x.device), **kw)
    # torch path
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if tabled:
        cs = gather_rows(device_table(s, kind, x.device, cd, build), t, x)
    elif scalar:
        cs = [c if cd == torch.float64 else f32(c, what) for c in coefs]
    else:
        cs = [
            per_sample(torch.from_numpy(np.broadcast_to(np.asarray(c, dtype=np.float64), (B,)).copy()).to(x.device, cd), x)
            for c in coefs
        ]
    a, b, c = cs[:3]
    p, q = (cs[3], cs[4]) if clip is not None else (None, None)
    xc, yc = to_dtype(x, cd), to_dtype(y, cd)
    if seed is not None:
        z = to_dtype(torch_normal(x.shape, seed, offset, x.device), cd)
        out = torch_affine(xc, a, yc, b, z, c, fresh_z=True, clip=clip, p=p, q=q)
    elif noise is not None:
        out = torch_affine(xc, a, yc, b, to_dtype(noise, cd), c, clip=clip, p=p, q=q)
    else:
        out = torch_affine(xc, a, yc, b, clip=clip, p=p, q=q)
    out = to_dtype(out, x.dtype)
    return out if out.is_contiguous() else out.contiguous()


def _host(t):
    """An index or time as a python scalar or a float64/int64 numpy array (B,)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return t


@functools.lru_cache(maxsize=64)
def _ddpm_std(s, variance: str) -> np.ndarray:
    """``ddpm_std`` once per (immutable) schedule and variance."""
    return ddpm_std(s, variance)


# ----------------------------------------------------------------------------- DDPM
def _ddpm_table(s, variance: str, clip: bool) -> np.ndarray:
    """Rows of the affine update for DDPM, float64 (k, T):
    no clip: (coef1 sra + coef2, -coef1 srm1, std); clip: (coef2, coef1, std, sra, -srm1),
    sra = sqrt(1/abar), srm1 = sqrt(1/abar - 1), std = 0 at t = 0."""
    std = _ddpm_std(s, variance)
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

    x_t, eps: tensors (B, ...); t: int or integer tensor (B,). z from ``noise`` or drawn in the
    kernel from ``seed`` (element i: draw offset + i); neither is needed when every t is 0.
    Returns x_{t-1} (contiguous, x_t's shape and dtype).
    """
    check_schedule(s)
    _check_variance(variance)
    clip = _check_clip(clip_x0)
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
    _check_finite_steps(s, tab, tmax)
    coefs = tuple(float(v) for v in tab[:, t]) if isinstance(t, int) else None
    return _step(x_t, eps, coefs, noise, seed, offset, clip=clip, s=s, kind=kind, build=build, t=t, what="s at t")


def _check_finite_steps(s, tab, tmax: int):
    """Refuse steps whose coefficients are infinite: where abar_t = 0 (a zero-terminal-SNR
    schedule's last step) x0 = x_t / sqrt(abar_t) - ... is undefined for eps-prediction."""
    bad = ~np.isfinite(tab).all(axis=0)
    if bad[: tmax + 1].any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"t = {i} has alphas_cumprod[t] = {s.alphas_cumprod[i]:.3g} (zero terminal SNR): an eps-prediction step "
            "is undefined there (1/sqrt(abar_t) = inf); start the chain at t < that step or use v-prediction"
        )


# ----------------------------------------------------------------------------- DDIM
def ddim_fold(s, t, t_prev, eta: float):
    """The folded DDIM coefficients (c_x, c_eps, c_z), float64 of the broadcast shape of the
    integer indices t (in [0, T)) and t_prev (in [-1, t)), with x_prev = c_x x_t + c_eps eps
    + c_z z   (DDIM eq. 12, sigma from eq. 16):

    c_x = sqrt(abar_prev) sqrt(1/abar_t),  c_eps = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) sqrt(1/abar_t - 1),
    c_z = sigma,

    built from the core ``diffmath.samplers.ddim.ddim_coefs`` (which validates t, t_prev, t_prev < t
    and eta, and computes sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2) and sigma without
    cancellation). At a zero-terminal-SNR step (abar_t = 0) c_x and c_eps are not finite; the
    caller refuses those.
    """
    if type(t) is int and type(t_prev) is int and isinstance(eta, (int, float)) and not isinstance(eta, bool):
        return _ddim_fold_scalar(s, t, t_prev, float(eta))
    return _ddim_fold(s, t, t_prev, eta)


@functools.lru_cache(maxsize=4096)
def _ddim_fold_scalar(s, t: int, t_prev: int, eta: float):
    # Schedules are immutable (frozen, read-only tables) and hash by identity, so the fold of a
    # (schedule, t, t_prev, eta) is computed and validated once: a sampling loop's host overhead
    # stays at a dictionary lookup. Errors are not cached (lru_cache does not store exceptions).
    return _ddim_fold(s, t, t_prev, eta)


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
        i = int(tb.reshape(-1)[int(np.argmax(~(np.isfinite(c_x) & np.isfinite(c_eps)).reshape(-1)))]) if np.ndim(c_x) else int(tn)
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
    return _step(x_t, eps, coefs, noise, seed, offset, what="s at (t, t_prev, eta)")


# ----------------------------------------------------------------------------- SDE and Langevin
def _check_sde_time(t, x, name: str = "t"):
    """SDE time in (0, 1]: a python float or a float (B,) array/tensor matching x's batch;
    returned as a python float or a float64 numpy array."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point SDE time in (0, 1]; got dtype {t.dtype}")
        t = t.item() if t.ndim == 0 else t.detach().to(torch.float64).cpu().numpy()
    elif isinstance(t, np.ndarray):
        if t.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point SDE time in (0, 1]; got dtype {t.dtype}")
        t = float(t) if t.ndim == 0 else t.astype(np.float64)
    elif isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name} must be a float SDE time in (0, 1] or a float tensor (B,); got {t!r:.60}")
    if isinstance(t, np.ndarray):
        if t.ndim != 1 or x.ndim == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(f"a batch of times {name} must have shape (B,) = ({rows_of(x)},); got shape {t.shape}")
        bad = ~((t > 0) & (t <= 1))
        if bad.any():
            raise ValueError(f"{name} must lie in (0, 1] (SDE time, T = 1); got {name} = {float(t[bad][0])}")
        return t
    t = float(t)
    if not 0 < t <= 1:
        raise ValueError(f"{name} must lie in (0, 1] (SDE time, T = 1); got {name} = {t}")
    return t


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
    x, score: tensors (B, ...); t: float in (0, 1] or float tensor (B,); t + dt >= 0. z from
    ``noise`` or ``seed``. Returns x' (contiguous, x's shape and dtype).
    """
    x = check_x(x, "x")
    score = check_like_x(score, x, "score", "x")
    dt = as_float(dt, "dt")
    if not dt < 0:
        raise ValueError(f"dt must be < 0 (a reverse-time step from t to t + dt); got dt = {dt}")
    t = _check_sde_time(t, x)
    if np.any(np.asarray(t) + dt < -1e-12):
        raise ValueError(f"t + dt must stay >= 0; got t = {float(np.min(t))}, dt = {dt}")
    noise, seed, offset = check_noise_args(noise, seed, offset, x, "x")
    a, g = _sde_coefs(sde, t)
    coefs = (1.0 + a * dt, -g * g * dt, g * math.sqrt(-dt))
    if np.ndim(t) == 0:
        coefs = tuple(float(c) for c in coefs)
    return _step(x, score, coefs, noise, seed, offset, what="sde (its drift/diffusion coefficients at t) with dt")


def _check_step_size(step_size, x):
    if isinstance(step_size, np.ndarray) and step_size.ndim == 0:
        step_size = step_size.item()
    if isinstance(step_size, torch.Tensor):
        step_size = step_size.item() if step_size.ndim == 0 else step_size.detach().to(torch.float64).cpu().numpy()
    if isinstance(step_size, np.ndarray) and step_size.ndim:
        h = step_size.astype(np.float64)
        if h.ndim != 1 or x.ndim == 0 or h.shape[0] != x.shape[0]:
            raise ValueError(f"step_size must be a float or have shape (B,) = ({rows_of(x)},); got shape {h.shape}")
        bad = ~((h > 0) & np.isfinite(h))
        if bad.any():
            raise ValueError(f"step_size must be finite and > 0; got step_size = {float(h[bad][0])}")
        return h
    h = as_float(step_size, "step_size")
    if not h > 0:
        raise ValueError(f"step_size must be finite and > 0; got step_size = {h}")
    return h


def langevin_step(x, score, step_size, *, noise=None, seed=None, offset=0):
    """One step of unadjusted Langevin dynamics   (Song & Ermon 2019, eq. 4):

    x' = x + (step_size / 2) score + sqrt(step_size) z,   z ~ N(0, I),

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
    return _step(x, score, coefs, noise, seed, offset, what="step_size")
