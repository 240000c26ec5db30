"""Fused forward noising  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4).

One pass over x0: the per-sample coefficients are gathered at t[b] in the kernel from
float32 copies of the schedule's float64 tables held on the device (built once per
schedule and device), and eps is drawn in the kernel (``seed=``) or read (``noise=``).
The launch and the torch path are the shared affine update (``_affine.affine_update``) with
no model term. ``q_sample_reference`` beside the wrapper is the torch reference the tests hold
both paths to: the verified core, ``diffmath.forward.q_sample``, in float64.
"""

from __future__ import annotations

import numpy as np

from .. import forward
from ..checks import check_schedule
from ._affine import affine_update
from ._common import check_index, check_noise_args, check_x
from .noise import randn

__all__ = ["q_sample", "q_sample_reference"]


def _q_table(s) -> np.ndarray:
    """Rows (a, b, c) of the affine update: (sqrt(abar), 0, sqrt(1 - abar)), float64 (3, T)."""
    return np.stack([s.sqrt_alphas_cumprod, np.zeros_like(s.betas), s.sqrt_one_minus_alphas_cumprod])


def q_sample(s, x0, t, *, noise=None, seed=None, offset=0):
    """Sample x_t ~ q(x_t | x_0):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4).

    As the fused affine update out = a x + b y' + c z (``_affine.py``), with x = x0, no y,
    z = eps:

        a = sqrt(abar_t),   b = 0,   c = sqrt(1 - abar_t)        (p, q unused: no clip)

    gathered at t[b] in the kernel (``_q_table``).

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
    coefs = (
        (float(s.sqrt_alphas_cumprod[t]), 0.0, float(s.sqrt_one_minus_alphas_cumprod[t]))
        if isinstance(t, int)
        else None
    )
    return affine_update(x0, None, coefs, noise, seed, offset, s=s, kind="q", build=_q_table, t=t, what=None)


def q_sample_reference(s, x0, t, *, noise=None, seed=None, offset=0):
    """The torch reference of ``q_sample``: the verified core ``diffmath.forward.q_sample`` in
    float64 on x0's device, returned in x0's dtype. eps is ``noise`` or, with ``seed``, the
    draws the active path would use (``diffmath.kernels.randn(x0.shape, seed, offset)``)."""
    eps = noise if noise is not None else randn(x0.shape, seed, offset, device=x0.device)
    return forward.q_sample(s, x0.double(), t, eps.double()).to(x0.dtype)
