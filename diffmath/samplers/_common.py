"""Plumbing shared by the sampler loops: explicit random draws, model calls, progress bars.

Randomness is explicit (docs/design.md, "Randomness"): a numpy loop draws from a
``numpy.random.Generator``, a torch loop from a ``torch.Generator`` (on its device);
``generator=None`` makes a fresh, OS-seeded generator of the right kind and never touches
global RNG state.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm

from .._array import check_float, check_positive, is_tensor, randn
from ..sde import check_score

__all__ = ["check_generator", "randn", "randn_like", "start", "model_t", "progress_bar", "check_positive", "check_steps"]


def check_generator(generator, like=None):
    """Validate ``generator`` against the kind of ``like`` (when given); None makes a fresh
    generator of ``like``'s kind (numpy when ``like`` is None)."""
    if generator is None:
        if is_tensor(like):
            g = torch.Generator(device=like.device)
            g.manual_seed(int(np.random.default_rng().integers(2**62)))
            return g
        return np.random.default_rng()
    if isinstance(generator, torch.Generator):
        if like is not None and not is_tensor(like):
            raise TypeError("generator is a torch.Generator but x_T is a numpy array; use a numpy.random.Generator")
        if is_tensor(like) and generator.device.type != like.device.type:
            raise ValueError(f"generator is on {generator.device} but x_T is on {like.device}")
        return generator
    if isinstance(generator, np.random.Generator):
        if is_tensor(like):
            raise TypeError("generator is a numpy.random.Generator but x_T is a torch tensor; use a torch.Generator")
        return generator
    raise TypeError(f"generator must be a numpy.random.Generator or a torch.Generator; got {type(generator).__name__}")


def randn_like(x, generator):
    return randn(x.shape, generator, like=x)


def start(shape, generator, x_T=None, scale: float = 1.0, dtype=None):
    """The loop's starting point: ``x_T`` (validated, never modified) or scale * N(0, I)
    of ``shape``. Returns (x, generator)."""
    if x_T is not None:
        x_T = check_float(x_T, "x_T")
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T must have the requested shape {tuple(shape)}; got {tuple(x_T.shape)}")
        return x_T, check_generator(generator, x_T)
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


def progress_bar(iterable, total: int, progress: bool, desc: str):
    return tqdm(iterable, total=total, disable=not progress, desc=desc, leave=False)


def check_steps(steps, T: int, name: str = "steps") -> int:
    """An integer number of steps in [1, T]."""
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of steps; got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"{name} must lie in [1, {T}]; got {name} = {int(steps)}")
    return int(steps)


def check_eta(eta) -> float:
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a real number >= 0; got {eta!r}")
    eta = float(eta)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0 (0 = deterministic DDIM, 1 = DDPM variance); got eta = {eta}")
    return eta
