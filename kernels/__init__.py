"""Fused kernels for diffusion training and sampling (installed as ``diffmath.kernels``).

The same math as the verified core (``diffmath.forward``, ``diffmath.samplers``,
``diffmath.losses``) on torch tensors, one fused Triton kernel per update on CUDA and a
minimal eager-torch expression elsewhere:

- ``q_sample(s, x0, t, *, noise=None, seed=None, offset=0)``           x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
- ``simple_loss(eps_pred, seed, offset=0, *, reduction="mean")``        mean (eps_pred - eps)^2, eps regenerated
- ``ddpm_step(s, x_t, t, eps, *, ..., variance="small", clip_x0=None)``
- ``ddim_step(s, x_t, t, t_prev, eps, *, ..., eta=0.0)``
- ``euler_maruyama_step(sde, x, t, dt, score, *, ...)``                 reverse-time SDE, dt < 0
- ``langevin_step(x, score, step_size, *, ...)``
- ``randn(shape, seed, offset=0, *, device, dtype)``                    the stream the kernels draw
- ``philox_normal(shape, seed, offset=0, *, device)``                   the Triton stream in torch ops

Noise: ``noise=`` (an explicit tensor) or ``seed=`` (drawn in the kernel; element i of the
output uses draw ``offset + i``). ``DIFFMATH_KERNELS=auto|triton|torch`` picks the path;
``TRITON_INTERPRET=1`` runs the Triton path on CPU. See docs/kernels.md.
"""

from ._common import use_triton
from .loss import simple_loss
from .noise import philox_normal, randn
from .noising import q_sample
from .samplers import ddim_fold, ddim_step, ddpm_step, euler_maruyama_step, langevin_step


def philox_active(x) -> bool:
    """Whether kernel calls on tensors like ``x`` take the Triton path, whose in-kernel noise for
    element i is Philox draw ``offset + i`` (the torch fallback keys its own stream by
    (seed, offset); docs/kernels.md). Unlike ``use_triton(x)`` it also answers for CPU tensors
    under ``DIFFMATH_KERNELS=triton`` with ``TRITON_INTERPRET=1``."""
    from ._affine import affine_kernel

    return bool(use_triton(x, affine_kernel))


__all__ = [
    "q_sample",
    "simple_loss",
    "ddpm_step",
    "ddim_step",
    "ddim_fold",
    "euler_maruyama_step",
    "langevin_step",
    "randn",
    "philox_normal",
    "use_triton",
    "philox_active",
]
