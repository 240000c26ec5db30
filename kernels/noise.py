"""The noise streams of ``diffmath.kernels``, materialised.

``randn(shape, seed, offset)`` returns exactly the N(0, I) draws that a kernel call on an
output of ``shape`` would use on the path that ``DIFFMATH_KERNELS`` selects for that device
and dtype (so ``q_sample(s, x0, t, seed=k)`` equals ``q_sample(s, x0, t, noise=randn(x0.shape, k))``
up to float32 rounding). ``philox_normal`` computes the Triton path's stream with torch integer
ops on any device (slow: for reproducing GPU noise on a CPU, and for checking the kernels).
"""

from __future__ import annotations

import math

import torch

from ..checks import check_int
from ._affine import affine_kernel, launch_affine
from ._common import check_offset, torch_normal, use_triton

__all__ = ["randn", "philox_normal", "philox_uint32"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _shape(shape):
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shape must hold non-negative sizes; got {shape}")
    return shape


def randn(shape, seed, offset=0, *, device=None, dtype=torch.float32):
    """Standard normal draws of ``shape`` from the active path's stream at ``(seed, offset)``:
    Philox draws ``offset + i`` on the Triton path, ``torch.Generator`` draws seeded by
    ``(seed, offset)`` on the torch path (docs/kernels.md, "The noise stream (binding)").
    float32 math, returned in ``dtype``. On the Triton path this is the fused affine update
    out = a x + b y + c z (``_affine.py``) with no x or y and (a, b, c) = (0, 0, 1): out = z."""
    shape = _shape(shape)
    seed = check_int(seed, "seed", 0, 2**64)
    n = math.prod(shape)
    offset = check_offset(offset, n)
    probe = torch.empty(0, device=device, dtype=dtype)
    if not probe.is_floating_point():
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    if n and use_triton(probe, affine_kernel):
        out = torch.empty(shape, device=probe.device, dtype=dtype)
        return launch_affine(out, scalars=(0.0, 0.0, 1.0, 0.0, 0.0), seed=seed, offset=offset, rows=1)
    return torch_normal(shape, seed, offset, probe.device).to(dtype)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2**32 and b in [0, 2**32), int64
    arithmetic without overflow (b split into 16-bit halves)."""
    bl, bh = b & 0xFFFF, b >> 16
    t1, t2 = a * bl, a * bh  # each < 2**48
    s = t1 + ((t2 & 0xFFFF) << 16)  # < 2**49
    return (t2 >> 16) + (s >> 32), s & _M32


def philox_uint32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 counter words, key (seed mod 2**32,
    seed >> 32); returns the four output words (int64 tensors in [0, 2**32))."""
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_normal(shape, seed, offset=0, *, device=None) -> torch.Tensor:
    """The Triton path's noise for an output of ``shape`` at ``(seed, offset)``, computed with
    torch int64 ops: Philox4x32-10 at counter (offset + i) // 4, lane (offset + i) % 4, key
    (seed mod 2**32, seed >> 32), Box-Muller as in ``_tile.py``. float32 on ``device``. The
    uint32 draws are bit-identical to the kernel's; the normals agree to float32 rounding of
    log/sin/cos (different libm)."""
    shape = _shape(shape)
    seed = check_int(seed, "seed", 0, 2**64)
    n = math.prod(shape)
    offset = check_offset(offset, n)
    if n == 0:
        return torch.empty(shape, device=device)
    c_first, c_last = offset // 4, (offset + n - 1) // 4
    ctr = torch.arange(c_first, c_last + 1, dtype=torch.int64, device=device)
    c0, c1, c2, c3 = philox_uint32(ctr & _M32, ctr >> 32, torch.zeros_like(ctr), torch.zeros_like(ctr), seed)

    def box_muller(a, b):
        u = a.to(torch.float32).mul_(2.0**-32).add_(2.0**-33)
        theta = (b - ((b >> 31) << 32)).to(torch.float32).mul_(2.0 * math.pi * 2.0**-32)  # b as int32
        r = u.log2_().mul_(-2.0 * math.log(2.0)).clamp_(min=0.0).sqrt_()
        return r * torch.cos(theta), r * torch.sin(theta)

    n0, n1 = box_muller(c0, c1)
    n2, n3 = box_muller(c2, c3)
    z = torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)
    start = offset - 4 * c_first
    return z[start : start + n].reshape(shape).contiguous()
