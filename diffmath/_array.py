"""numpy/torch dispatch helpers and input validation, shared by every math module.

Conventions (docs/design.md, "Arrays"): every math function accepts numpy arrays or torch tensors and
returns the same kind on the same device. Schedule tables are float64 numpy arrays; a
per-sample coefficient gathered at ``t`` of shape ``(B,)`` is reshaped to
``(B, 1, 1, ...)`` so it broadcasts over the trailing dimensions of ``x``. float16 and
bfloat16 inputs compute in float32 and are cast back at the end.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from typing_extensions import TypeIs

#: A numpy array or a torch tensor (CPU or CUDA) of either kind.
Array: TypeAlias = np.ndarray | torch.Tensor
#: The same kind in and out: math functions return the kind (and device) they are given
#: (docs/design.md, "Arrays").
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
#: A timestep: a Python or numpy scalar, or an array/tensor of shape (B,); integer indices for
#: the discrete schedules, float times in [0, 1] for the SDEs.
TimeLike: TypeAlias = int | float | np.integer | np.floating | np.ndarray | torch.Tensor

__all__ = [
    "is_tensor",
    "schedule_cache",
    "schedule_table",
    "compute_dtype",
    "upcast",
    "restore",
    "gather",
    "gather_t",
    "broadcast_to_like",
    "broadcast_coef",
    "widen_for_tables",
    "randn",
    "backend",
]


def is_tensor(x: object) -> TypeIs[torch.Tensor]:
    return isinstance(x, torch.Tensor)


class _NumpyOps:
    exp = staticmethod(np.exp)
    expm1 = staticmethod(np.expm1)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    clip = staticmethod(np.clip)

    @staticmethod
    def log_ndtr(x):
        from scipy.special import log_ndtr

        return log_ndtr(x)

    @staticmethod
    def erf(x):
        from scipy.special import erf

        return erf(x)

    @staticmethod
    def ndtr(x):
        from scipy.special import ndtr

        return ndtr(x)

    @staticmethod
    def mean_over_non_batch(x):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1).mean(axis=1) if x.ndim > 1 else x

    @staticmethod
    def sum_over_non_batch(x):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1).sum(axis=1) if x.ndim > 1 else x


class _TorchOps:
    exp = staticmethod(torch.exp)
    expm1 = staticmethod(torch.expm1)
    log = staticmethod(torch.log)
    log1p = staticmethod(torch.log1p)
    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)

    @staticmethod
    def clip(x, lo, hi):
        return torch.clamp(x, lo, hi)

    log_ndtr = staticmethod(torch.special.log_ndtr)
    erf = staticmethod(torch.special.erf)
    ndtr = staticmethod(torch.special.ndtr)

    @staticmethod
    def mean_over_non_batch(x):
        return x.reshape(x.shape[0], -1).mean(dim=1) if x.ndim > 1 else x

    @staticmethod
    def sum_over_non_batch(x):
        return x.reshape(x.shape[0], -1).sum(dim=1) if x.ndim > 1 else x


def backend(x):
    """The elementwise-ops namespace matching ``x``'s kind (numpy or torch)."""
    return _TorchOps if is_tensor(x) else _NumpyOps


def compute_dtype(x):
    """float16/bfloat16 compute in float32; float32/float64 keep their precision."""
    if is_tensor(x):
        return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return np.float32 if x.dtype == np.float16 else x.dtype


def upcast(x):
    cd = compute_dtype(x)
    if is_tensor(x):
        return x if x.dtype == cd else x.to(cd)
    return x if x.dtype == cd else x.astype(cd)


def restore(out, like):
    """Cast a result back to the dtype of the input ``like``."""
    if is_tensor(like):
        return out if out.dtype == like.dtype else out.to(like.dtype)
    out = np.asarray(out)
    if out.dtype == like.dtype:
        return out
    with np.errstate(over="ignore"):  # beyond the output dtype's range is +-inf, documented
        return out.astype(like.dtype)


# Values derived from a schedule, computed once per schedule and key and dropped with it: a
# Schedule is a frozen dataclass of read-only arrays (eq=False, so hashable by identity). Shared
# by the core's tables and the kernels' host/device tables and folded coefficients.
_PER_SCHEDULE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def schedule_cache(s, key, build):
    """``build(s)``, computed once per schedule ``s`` and hashable ``key`` and kept for the
    schedule's lifetime (an exception from ``build`` is raised and nothing is stored)."""
    per = _PER_SCHEDULE.get(s)
    if per is None:
        per = _PER_SCHEDULE[s] = {}
    try:
        return per[key]
    except KeyError:
        v = per[key] = build(s)
        return v


def schedule_table(s: object, key: Hashable, build: Callable[[Any], Any]) -> np.ndarray:
    """``build(s)`` (a float64 array), computed once per schedule and ``key``, read-only."""

    def table(s):
        tab = np.asarray(build(s), dtype=np.float64)
        tab.setflags(write=False)
        return tab

    return schedule_cache(s, ("table", key), table)


def gather(table, t, x):
    """Coefficient ``table[t]`` in x's kind, device and (compute) dtype.

    The float64 table is indexed in float64 and cast once at the end. A scalar ``t`` gives a
    0-d coefficient; ``t`` of shape (B,) gives shape (B, 1, ..., 1) with ``x.ndim`` dims.
    """
    table = np.asarray(table, dtype=np.float64)
    ndim = max(np.ndim(x), 1)
    if is_tensor(x):
        dt = x.dtype
        if isinstance(t, int):
            return torch.tensor(float(table[t]), dtype=dt, device=x.device)
        if is_tensor(t):
            tt = t.to(device=x.device, dtype=torch.long)
            c = torch.tensor(table, device=x.device)[tt]  # a copy: the tables are read-only
        else:
            c = torch.from_numpy(table[np.asarray(t, dtype=np.int64)]).to(x.device)
        return c.to(dt).reshape((-1,) + (1,) * (ndim - 1))
    ndt = np.asarray(x).dtype
    if isinstance(t, int):
        return np.asarray(table[t], dtype=ndt)
    idx = t.detach().cpu().numpy() if is_tensor(t) else np.asarray(t)
    return table[idx.astype(np.int64)].astype(ndt).reshape((-1,) + (1,) * (ndim - 1))


def gather_t(table, t, like=None):
    """``table[t]`` with the shape of ``t`` (no broadcasting), float64 numpy for numpy/int t,
    a float64 tensor on t's device for tensor t (or ``like``'s kind when given)."""
    table = np.asarray(table, dtype=np.float64)
    ref = like if like is not None else t
    if is_tensor(ref) or is_tensor(t):
        dev = ref.device if is_tensor(ref) else t.device
        if isinstance(t, int):
            return torch.tensor(float(table[t]), dtype=torch.float64, device=dev)
        idx = torch.as_tensor(t.detach().cpu().numpy() if is_tensor(t) else np.asarray(t), dtype=torch.long)
        return torch.tensor(table)[idx].to(dev)
    if isinstance(t, int):
        return np.float64(table[t])
    return table[np.asarray(t, dtype=np.int64)]


def broadcast_to_like(c, x):
    """Materialise coefficient ``c`` at the full shape of ``x`` (a writable array)."""
    if is_tensor(x):
        return (c + torch.zeros_like(x)).to(x.dtype)
    return (np.asarray(c) + np.zeros_like(x)).astype(x.dtype)


def broadcast_coef(c, x):
    """A float64 coefficient ``c`` (python float, 0-d or shape (B,); numpy or torch) in x's
    kind, device and compute dtype, shaped (B, 1, ..., 1) with ``x.ndim`` dims when it is
    per-sample, so that it broadcasts over the trailing dimensions of ``x``."""
    dt = compute_dtype(x)
    ndim = max(np.ndim(x), 1)
    if is_tensor(x):
        c = (c if is_tensor(c) else torch.as_tensor(np.asarray(c, dtype=np.float64))).to(dtype=dt, device=x.device)
    elif is_tensor(c):
        c = c.detach().cpu().numpy().astype(dt)
    else:
        c = np.asarray(c).astype(dt)
    if c.ndim == 1:
        c = c.reshape((-1,) + (1,) * (ndim - 1))
    return c


def _float32_misfits(s: object, name: str) -> tuple[np.ndarray, bool]:
    """(entries of the float64 table ``s.<name>`` that float32 cannot hold: finite but beyond
    its range, or nonzero but below its smallest subnormal; whether there is any), computed
    once per schedule and table."""

    def build(s):
        tab = np.asarray(getattr(s, name), dtype=np.float64)
        with np.errstate(over="ignore", under="ignore"):
            t32 = tab.astype(np.float32)
        bad = np.isfinite(tab) & (np.isinf(t32) | ((t32 == 0) & (tab != 0)))
        bad.setflags(write=False)
        return bad, bool(bad.any())

    return schedule_cache(s, ("float32_misfits", name), build)


def widen_for_tables(s, t, names, *xs):
    """``xs`` (upcast arrays of one kind and compute dtype) unchanged, or all in float64 where
    that dtype is float32 and a float64 table ``s.<name>`` at ``t`` does not fit float32.

    In float32, 1/sqrt(abar_t) overflows for abar_t < ~1e-77, and inf x_t - inf eps = NaN
    where the value is finite (or +-inf with a sign); a coefficient that rounds to 0 turns a
    division into 0/0. Computing such a step in float64 and rounding once at the end
    (``restore``) gives the float32 number, or +-inf with the right sign where the value is
    beyond float32's range, never NaN. Other steps keep their float32 path, bit for bit. The
    test costs a dictionary lookup unless the schedule holds such entries at all. (On an MPS
    device, which has no float64, the float32 path is kept.)"""
    x = xs[0]
    if is_tensor(x):
        if x.dtype == torch.float64 or x.device.type == "mps":
            return xs
    elif x.dtype == np.float64:
        return xs
    for name in names:
        bad, any_bad = _float32_misfits(s, name)
        if not any_bad:
            continue
        if isinstance(t, int):
            hit = bool(bad[t])
        else:
            hit = bool(bad[np.asarray(t.detach().cpu() if is_tensor(t) else t, dtype=np.int64)].any())
        if hit:
            return tuple(v.to(torch.float64) if is_tensor(v) else np.asarray(v, dtype=np.float64) for v in xs)
    return xs


def randn(shape, generator, like=None, dtype=None):
    """Standard normal draws of ``shape`` from ``generator`` (never global RNG state), in
    ``like``'s dtype and device, else ``dtype`` (default: float64 numpy for a
    ``numpy.random.Generator``, float32 torch on the generator's device for a
    ``torch.Generator``). float16/bfloat16 tensors are drawn in float32 and rounded."""
    shape = tuple(int(n) for n in shape)
    if isinstance(generator, torch.Generator):
        dt = like.dtype if like is not None else (dtype if dtype is not None else torch.float32)
        if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise TypeError(f"dtype must be a floating torch dtype for a torch.Generator; got {dt!r}")
        dev = like.device if like is not None else generator.device
        if dt in (torch.float16, torch.bfloat16):
            return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32).to(dt)
        return torch.randn(shape, generator=generator, device=dev, dtype=dt)
    dt = like.dtype if like is not None else (dtype if dtype is not None else np.float64)
    if isinstance(dt, torch.dtype) or np.dtype(dt).kind != "f":
        raise TypeError(f"dtype must be a floating numpy dtype for a numpy.random.Generator; got {dt!r}")
    return generator.standard_normal(shape).astype(dt, copy=False)
