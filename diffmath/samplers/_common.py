"""Plumbing shared by the sampler loops: explicit random draws, model calls, progress bars,
and the precision of the loop state.

Randomness is explicit (docs/design.md, "Randomness"): a numpy loop draws from a
``numpy.random.Generator``, a torch loop from a ``torch.Generator`` (on its device);
``generator=None`` makes a fresh, OS-seeded generator of the right kind and never touches
global RNG state.

The loop state keeps its precision (docs/samplers.md, "Precision of the loop state"): the
state x is float32, or float64 when x_T is float64 (``start``), whatever the dtype of x_T,
the model output or the noise; a float16/bfloat16 x_T is upcast once, a half-precision model
output is upcast before each update (``LoopModel``), the model gets the state in the state's
dtype, and the result is returned in the state's dtype unless the caller asks for another
(``check_out_dtype`` / ``finish``: one rounding at the very end). A model output that is not
finite stops the loop with a ValueError naming the step and t (``LoopModel``).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .._array import is_tensor, randn, upcast
from ..checks import check_float, check_generator, check_sde
from ..sde import check_score

__all__ = [
    "randn",
    "randn_like",
    "start",
    "model_t",
    "progress_bar",
    "LoopModel",
    "to_state",
    "check_out_dtype",
    "finish",
    "check_score_args",
]


def check_score_args(sde, score_fn):
    """Validate a score-based loop's ``sde`` and ``score_fn(x, t)`` (once, at the public entry)."""
    check_sde(sde)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t); got {type(score_fn).__name__}")


def randn_like(x, generator):
    return randn(x.shape, generator, like=x)


def start(shape, generator, x_T=None, scale: float = 1.0, dtype=None):
    """The loop's starting point, in the state's dtype: ``x_T`` (validated, never modified;
    float16/bfloat16 upcast to float32, float32/float64 kept, not copied) or scale * N(0, I)
    of ``shape`` (numpy float64 / torch float32 unless ``dtype``). A non-floating x_T (int,
    bool, complex) is a TypeError naming its dtype. Returns (x, generator)."""
    if x_T is not None:
        x_T = check_float(x_T, "x_T")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T must have the requested shape {tuple(shape)}; got {tuple(x_T.shape)}")
        return upcast(x_T), check_generator(generator, x_T)
    if shape is None:
        raise ValueError("give a shape (B, ...) or x_T")
    shape = tuple(shape)
    if len(shape) < 1 or any((not isinstance(n, (int, np.integer))) or n < 1 for n in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...); got {shape!r}")
    generator = check_generator(generator)
    x = randn(shape, generator, dtype=dtype)
    return (x * scale if scale != 1.0 else x), generator


def model_t(value, x, integer: bool = True):
    """A per-sample argument for a model call: shape (B,), x's kind and device; int64 for
    timestep indices, x's compute dtype for float times/sigmas."""
    B = x.shape[0]
    if is_tensor(x):
        if integer:
            return torch.full((B,), int(value), dtype=torch.long, device=x.device)
        dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.full((B,), float(value), dtype=dt, device=x.device)
    if integer:
        return np.full(B, int(value), dtype=np.int64)
    return np.full(B, float(value), dtype=x.dtype if x.dtype in (np.float32, np.float64) else np.float64)


def call_model(model, x, targ, name: str):
    """``model(x, targ)``, its output checked against x's kind and shape."""
    return check_score(model(x, targ), x, name)


def _eps_of(dtype) -> float:
    return float(torch.finfo(dtype).eps) if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).eps)


def to_state(out, x):
    """A model output ``out`` in the precision of the state ``x``: upcast when it is narrower
    (a float16/bfloat16 output for a float32 state, float32 for float64), never rounded down
    (a wider output stays as it is and the step's arithmetic promotes, as before)."""
    if out.dtype == x.dtype or _eps_of(out.dtype) <= _eps_of(x.dtype):
        return out
    return out.to(x.dtype) if is_tensor(out) else out.astype(x.dtype)


def _first(v):
    """The first entry of a per-sample argument (B,) as a python number, for messages."""
    if is_tensor(v):
        v = v.detach().reshape(-1)[0].item() if v.numel() else float("nan")
    elif isinstance(v, np.ndarray):
        v = v.reshape(-1)[0].item() if v.size else float("nan")
    return v


class LoopModel:
    """A model as a loop calls it: ``model(x, t)`` with x the loop state, its output checked
    (x's kind, device and shape; a floating dtype, else TypeError naming it), upcast to the
    state's precision (``to_state``) and finite. A NaN or inf in the output stops the loop
    with a ValueError naming the loop, its step (``self.step``, set by the loop) and t, once
    per model call: one ``isfinite().all()`` reduction, cheap next to a network."""

    def __init__(self, model, name: str, loop: str, total: int, tname: str = "t"):
        self.model, self.name, self.loop, self.total, self.tname = model, name, loop, int(total), tname
        self.step = 0

    def __call__(self, x, targ):
        out = to_state(check_score(self.model(x, targ), x, self.name), x)
        finite = bool(torch.isfinite(out).all()) if is_tensor(out) else bool(np.isfinite(out).all())
        if not finite:
            tv = _first(targ)
            tv = f"{tv:.6g}" if isinstance(tv, float) else f"{tv}"
            where = "the final denoising step" if self.step >= self.total else f"step {self.step + 1} of {self.total}"
            raise ValueError(
                f"{self.name} returned a non-finite value (NaN or inf) at {where} of {self.loop} "
                f"({self.tname} = {tv}); stopping, the samples would be NaN (check the model's weights and inputs)"
            )
        return out


def check_out_dtype(out_dtype, x):
    """``out_dtype`` of a loop: None (return the state's dtype) or a floating dtype of the
    state's kind (a torch.dtype for torch, a numpy dtype for numpy), else TypeError."""
    if out_dtype is None:
        return None
    if is_tensor(x):
        if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"out_dtype must be None or a floating torch.dtype for a torch loop; got {out_dtype!r}")
        return out_dtype
    try:
        dt = None if isinstance(out_dtype, torch.dtype) else np.dtype(out_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise TypeError(f"out_dtype must be None or a floating numpy dtype for a numpy loop; got {out_dtype!r}")
    return dt


def finish(x, out_dtype):
    """The loop's result: the state, rounded once to ``out_dtype`` if one was asked for."""
    if out_dtype is None or x.dtype == out_dtype:
        return x
    return x.to(out_dtype) if is_tensor(x) else x.astype(out_dtype)


def progress_bar(iterable, total: int, progress: bool, desc: str):
    return tqdm(iterable, total=total, disable=not progress, desc=desc, leave=False)
