"""Dispatch, input validation, device-side schedule tables and the torch path's noise stream,
shared by every kernel family in ``diffmath.kernels``.

Dispatch (``DIFFMATH_KERNELS``, read at every call):

- ``auto`` (default): the Triton kernel for CUDA tensors of dtype float32/float16/bfloat16,
  the torch path otherwise (CPU tensors, float64, Triton not installed);
- ``triton``: always the Triton kernel; CPU tensors need the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``triton`` and ``diffmath.kernels`` are imported);
- ``torch``: always the torch path.

Noise streams. The Triton path draws element i of a call's contiguous output from Philox
draw number ``offset + i`` under ``seed`` (see ``_tile.py``). The torch path draws
``torch.randn(shape, generator=G)`` with ``G`` a generator on the data's device seeded with
``stream_seed(seed, offset)``, so a call with the same ``(seed, offset)`` and the same number
of elements regenerates the same noise (what ``simple_loss`` needs); its draws do not shift
with ``offset`` the way the Philox stream does, and a CPU generator keeps only 32 bits of its
seed (docs/kernels.md). With ``noise=`` both paths compute the same result up to float32
rounding.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import struct
import threading
from typing import cast

import numpy as np
import torch

from .._array import schedule_cache
from ..checks import check_float, check_int, check_like, check_t
from ..schedules import Schedule

__all__ = [
    "use_triton",
    "check_x",
    "check_like_x",
    "check_noise_args",
    "check_offset",
    "check_index",
    "device_table",
    "host_table",
    "first_nonfinite",
    "stream_seed",
    "stream_generator",
    "torch_normal",
    "MAX_OFFSET",
]

try:  # Triton is optional: without it every call takes the torch path.
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

#: float dtypes the Triton kernels take (math in float32); float64 always takes the torch path.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
#: offset + numel must stay below this (the Philox counter is kept in a signed 64-bit int).
MAX_OFFSET = 2**62
_MODES = ("auto", "triton", "torch")
_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def interpreting(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_triton(x: torch.Tensor, kernel=None) -> bool:
    """Whether a call on ``x`` takes the Triton path (see the module docstring)."""
    mode = os.environ.get("DIFFMATH_KERNELS") or "auto"
    if mode not in _MODES:
        mode = mode.strip().lower() or "auto"
        if mode not in _MODES:
            raise ValueError(f"DIFFMATH_KERNELS must be one of {', '.join(_MODES)}; got {mode!r}")
    if mode == "torch":
        return False
    if mode == "auto":
        return HAVE_TRITON and x.is_cuda and x.dtype in KERNEL_DTYPES
    if not HAVE_TRITON:
        raise RuntimeError(
            "DIFFMATH_KERNELS=triton but triton is not importable; install triton or use DIFFMATH_KERNELS=auto"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the Triton kernels take float32, float16 or bfloat16 tensors; got {x.dtype} "
            "(float64 runs on the torch path: DIFFMATH_KERNELS=auto or torch)"
        )
    if x.device.type == "cpu":
        if not _interpreting_kernel(kernel):
            raise RuntimeError(
                "DIFFMATH_KERNELS=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton and diffmath.kernels (or use a CUDA tensor, or DIFFMATH_KERNELS=auto)"
            )
    elif not x.is_cuda:
        raise RuntimeError(
            f"DIFFMATH_KERNELS=triton supports CUDA tensors (or CPU with TRITON_INTERPRET=1); got {x.device}"
        )
    return True


def _interpreting_kernel(kernel) -> bool:
    return kernel is not None and interpreting(kernel)


# ----------------------------------------------------------------------------- validation
# Each check accepts the common valid input on a fast path of a few attribute tests (host
# overhead per call matters: a small DDIM step is ~40 us) and hands everything else to the
# core's check (diffmath._array), so that bad input gets the core's error message; only what
# the core accepts but the kernels do not (numpy data, float dtypes other than these four,
# tensors that require grad) gets a kernel-specific message.
def check_x(x, name: str, grad_ok: bool = False) -> torch.Tensor:
    """A floating-point torch tensor of a supported dtype (not requiring grad unless ``grad_ok``)."""
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES):
        _reject_x(x, name)
    if x.requires_grad and not grad_ok and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad: the fused noising/sampler kernels build no autograd graph; call them under "
            "torch.no_grad() or pass a detached tensor (diffmath.forward / diffmath.samplers are differentiable)"
        )
    return x


def _reject_x(x, name: str):
    """Raise the error for an ``x`` that ``check_x`` refuses: the core's for what it refuses too."""
    check_float(x, name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch tensor; got {type(x).__name__} (the numpy versions live in diffmath.forward, "
            "diffmath.samplers and diffmath.losses)"
        )
    raise TypeError(f"{name} must be a float32, float16, bfloat16 or float64 tensor; got dtype {x.dtype}")


def check_like_x(y, x: torch.Tensor, name: str, xname: str) -> torch.Tensor:
    """``y``: a float tensor on x's device with x's shape (any supported float dtype)."""
    if not (isinstance(y, torch.Tensor) and y.device == x.device and y.shape == x.shape):
        check_like(y, x, name, xname)  # the core's error for another kind, device or shape
    return check_x(y, name)


def check_offset(offset, numel: int) -> int:
    """A stream offset: an int >= 0 with offset + numel <= MAX_OFFSET."""
    offset = check_int(offset, "offset", 0, MAX_OFFSET)
    if offset + numel > MAX_OFFSET:
        raise ValueError(f"offset + numel must stay below 2**62; got offset = {offset}, numel = {numel}")
    return offset


def check_noise_args(noise, seed, offset, x: torch.Tensor, xname: str, needed: bool = True):
    """Validate the ``noise=`` / ``seed=`` / ``offset=`` keywords of a noisy kernel.

    Returns ``(noise, seed, offset)`` with ``noise`` a tensor or None, ``seed`` an int or None.
    """
    if noise is not None and seed is not None:
        raise ValueError("pass either noise= (an explicit N(0, I) tensor) or seed= (in-kernel noise), not both")
    offset = check_offset(offset, x.numel())
    if noise is not None:
        return check_like_x(noise, x, "noise", xname), None, offset
    if seed is None:
        if needed:
            raise ValueError(
                "this step needs noise: pass seed=<int in [0, 2**64)> to draw it in the kernel "
                f"(Philox, keyed by seed and offset) or noise=<tensor of {xname}'s shape> with N(0, I) draws"
            )
        return None, None, offset
    return None, check_int(seed, "seed", 0, 2**64), offset


def check_index(t, T: int, x: torch.Tensor, name: str = "t", lo: int = 0):
    """A discrete timestep index in [lo, T), validated as the core's ``check_t`` does (same
    errors): a python int, or an integer tensor of shape (B,) matching x's batch (anything else
    the core accepts, such as a 0-d tensor or an integer numpy array, is converted).

    Returns ``(t, tmin, tmax)`` with t an int or a contiguous (B,) int64 tensor on x's device.
    """
    if type(t) is int:
        if lo <= t < T:
            return t, t, t
    elif isinstance(t, torch.Tensor) and t.dtype in _INT_DTYPES and t.ndim == 1 and x.ndim and t.shape[0] == x.shape[0]:
        if t.numel() == 0:
            return t.to(device=x.device, dtype=torch.long), lo, lo
        tmin_t, tmax_t = torch.aminmax(t)
        tmin, tmax = int(tmin_t), int(tmax_t)
        if lo <= tmin and tmax < T:
            if t.dtype != torch.long or t.device != x.device:
                t = t.to(device=x.device, dtype=torch.long)
            return (t if t.is_contiguous() else t.contiguous()), tmin, tmax
    t = check_t(t, T, x, name, lo)  # raises the core's error for bad input
    if isinstance(t, int):
        return t, t, t
    t = torch.as_tensor(np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.int64), device=x.device)
    if t.numel() == 0:
        return t, lo, lo
    return t.contiguous(), int(t.min()), int(t.max())


def rows_of(x: torch.Tensor) -> int:
    """The batch size B (1 for a 0-d tensor)."""
    return int(x.shape[0]) if x.ndim else 1


def per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) coefficient viewed as (B, 1, ..., 1) to broadcast over x."""
    return c.reshape((-1,) + (1,) * (x.ndim - 1)) if x.ndim else c.reshape(())


def gather_rows(tab: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """Columns t of a (k, T) table as k coefficients of shape (B, 1, ..., 1) (one index_select)."""
    g = tab.index_select(1, t)
    return g.view((tab.shape[0], -1) + (1,) * (x.ndim - 1)).unbind(0) if x.ndim else g.view(tab.shape[0]).unbind(0)


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


_F32 = struct.Struct("=f")


def f32(v: float, name: str | None = None) -> float:
    """``v`` rounded to float32 (both paths then use bit-identical coefficients). With ``name``
    (the argument ``v`` comes from), a value that is not finite in float32 raises ValueError."""
    try:
        r = _F32.unpack(_F32.pack(v))[0]  # round to nearest float32, as np.float32(v), without errstate
    except OverflowError:  # finite but beyond float32's range
        r = math.copysign(math.inf, v)
    if name is not None and not math.isfinite(r):
        raise ValueError(
            f"{name} gives the coefficient {v:.4g}, which is not finite in float32 (the step would return inf/NaN)"
        )
    return r


# ----------------------------------------------------------------------------- device tables
# The float64 host table of each kind and its float32 (or float64) copies, one per (kind,
# device, dtype), kept per schedule by the core's ``schedule_cache`` and dropped with the schedule.
def host_table(s: Schedule, kind, build) -> np.ndarray:
    """The float64 (k, T) table ``build(s)``, computed once per schedule and cached."""

    def table(s):
        tab = np.ascontiguousarray(np.atleast_2d(np.asarray(build(s), dtype=np.float64)))
        tab.setflags(write=False)
        return tab

    return schedule_cache(s, (kind, "host", torch.float64), table)


def first_nonfinite(s: Schedule, kind, build) -> tuple:
    """``(i64, i32, v32)``: the first column of the table ``build(s)`` that holds a value which is
    not finite in float64, the first that holds one which is not finite once cast to float32, and
    that float64 value (T and None where there is none); found once per schedule and table and
    cached with it."""

    def find(s):
        tab = host_table(s, kind, build)
        T = tab.shape[1]
        with np.errstate(over="ignore", invalid="ignore"):
            bad64, bad32 = ~np.isfinite(tab), ~np.isfinite(tab.astype(np.float32))
        c64, c32 = np.flatnonzero(bad64.any(axis=0)), np.flatnonzero(bad32.any(axis=0))
        i64 = int(c64[0]) if c64.size else T
        i32 = int(c32[0]) if c32.size else T
        return i64, i32, (float(tab[:, i32][bad32[:, i32]][0]) if i32 < T else None)

    return schedule_cache(s, (kind, "first_nonfinite"), find)


def device_table(s: Schedule, kind, device: torch.device, dtype: torch.dtype, build) -> torch.Tensor:
    """The (k, T) table ``build(s)`` (float64 numpy) as a contiguous ``dtype`` tensor on
    ``device``, built and moved once, then cached for the schedule's lifetime."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    return schedule_cache(
        s,
        (kind, device, dtype),
        lambda s: torch.tensor(host_table(s, kind, build), dtype=dtype).to(device).contiguous(),
    )


# ----------------------------------------------------------------------------- torch noise stream
_PERSON = b"diffmath-noise1"
_GENERATORS = threading.local()


def stream_seed(seed: int, offset: int) -> int:
    """The 64-bit seed of the torch path's generator for a call at ``(seed, offset)``:
    BLAKE2b-64 of the two little-endian uint64s (distinct pairs give unrelated streams)."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, offset), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little")


def stream_generator(seed: int, offset: int, device: torch.device) -> torch.Generator:
    """The ``torch.Generator`` of the torch path's stream at ``(seed, offset)``: one per thread
    and device, re-seeded with ``stream_seed(seed, offset)`` on every call."""
    # the thread-local's own namespace, keyed by device
    gens = cast("dict[torch.device, torch.Generator]", _GENERATORS.__dict__)
    g = gens.get(device)
    if g is None:
        g = gens[device] = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, offset))
    return g


def torch_normal(shape, seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """The torch path's noise: float32 N(0, 1) draws of ``shape`` (in the order of the flat,
    contiguous output) from ``stream_generator(seed, offset, device)``."""
    device = torch.device(device)
    return torch.randn(shape, generator=stream_generator(seed, offset, device), device=device, dtype=torch.float32)


def as_float(v, name: str) -> float:
    if isinstance(v, torch.Tensor) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {name} = {v}")
    return v
