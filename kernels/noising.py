"""Fused forward noising  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4).

One pass over x0: the per-sample coefficients are gathered at t[b] in the kernel from
float32 copies of the schedule's float64 tables held on the device (built once per
schedule and device), and eps is drawn in the kernel (``seed=``) or read (``noise=``).
"""

from __future__ import annotations

import numpy as np
import torch

from ._affine import affine_kernel, launch_affine, torch_affine
from ._common import (
    check_index,
    check_noise_args,
    check_schedule,
    check_x,
    device_table,
    f32,
    gather_rows,
    rows_of,
    to_dtype,
    torch_normal,
    use_triton,
)

__all__ = ["q_sample"]


def _q_table(s) -> np.ndarray:
    """Rows (a, b, c) of the affine update: (sqrt(abar), 0, sqrt(1 - abar)), float64 (3, T)."""
    return np.stack([s.sqrt_alphas_cumprod, np.zeros_like(s.betas), s.sqrt_one_minus_alphas_cumprod])


def q_sample(s, x0, t, *, noise=None, seed=None, offset=0):
    """Sample x_t ~ q(x_t | x_0):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4).

    x0: tensor (B, ...) (float32/float16/bfloat16 on the kernel path; math in float32, output
    in x0's dtype); t: int or integer tensor (B,) in [0, T); eps is ``noise`` (x0's shape) or,
    with ``seed``, drawn in the kernel: element i of x_t uses draw ``offset + i`` of the
    stream keyed by ``seed`` (``simple_loss(eps_pred, seed, offset)`` regenerates the same eps).
    Returns x_t, contiguous, with x0's shape and dtype.
    """
    check_schedule(s)
    x0 = check_x(x0, "x0")
    t, _, _ = check_index(t, s.num_timesteps, x0)
    noise, seed, offset = check_noise_args(noise, seed, offset, x0, "x0")
    if x0.numel() == 0:
        return torch.empty_like(x0, memory_format=torch.contiguous_format)
    if use_triton(x0, affine_kernel):
        out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
        z = noise.contiguous() if noise is not None else None
        if isinstance(t, int):
            sc = (f32(s.sqrt_alphas_cumprod[t]), 0.0, f32(s.sqrt_one_minus_alphas_cumprod[t]), 0.0, 0.0)
            return launch_affine(out, x=x0.contiguous(), z=z, scalars=sc, seed=seed, offset=offset, rows=rows_of(x0))
        tab = device_table(s, "q", x0.device, torch.float32, _q_table)
        return launch_affine(out, x=x0.contiguous(), z=z, coef=tab, t=t, seed=seed, offset=offset, rows=rows_of(x0))
    return _q_sample_torch(s, x0, t, noise, seed, offset)


def _q_sample_torch(s, x0, t, noise, seed, offset):
    """The torch path: one randn (or the given noise) and two passes, math in float32
    (float64 for float64 input)."""
    cd = torch.float64 if x0.dtype == torch.float64 else torch.float32
    if isinstance(t, int):
        rnd = float if cd == torch.float64 else f32
        a, c = rnd(s.sqrt_alphas_cumprod[t]), rnd(s.sqrt_one_minus_alphas_cumprod[t])
    else:
        a, _, c = gather_rows(device_table(s, "q", x0.device, cd, _q_table), t, x0)
    xc = to_dtype(x0, cd)
    if seed is not None:
        z = to_dtype(torch_normal(x0.shape, seed, offset, x0.device), cd)
        out = torch_affine(xc, a, z=z, c=c, fresh_z=True)
    else:
        out = torch_affine(xc, a, z=to_dtype(noise, cd), c=c)
    out = to_dtype(out, x0.dtype)
    return out if out.is_contiguous() else out.contiguous()
