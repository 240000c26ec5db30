"""Argument checks: the one validation layer of diffmath.

Every public function validates its arguments here, once, where the user calls in, then runs
the math on values it can trust (docs/design.md, "Validation"). Each check raises TypeError
for the wrong kind and ValueError for a value out of range, naming the argument, the bad value
and the valid range, and returns the value in the form the math uses (a python float, an int,
a float64 array). The core, the samplers and the kernels all import their checks from this
module; none of them imports another module's private check.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from ._array import is_tensor, upcast

__all__ = [
    "check_float",
    "check_like",
    "check_schedule",
    "check_positive",
    "check_t",
    "check_pair",
    "check_generator",
    "check_steps",
    "check_eta",
    "check_variance",
    "check_clip",
    "check_time",
    "check_signal",
    "check_tol",
    "check_eps",
    "check_dt",
    "check_sde",
    "check_pc_args",
    "check_int",
]


def check_float(x: Any, name: str) -> Any:
    """Validate that ``x`` is a floating-point array or tensor; python floats and lists of
    floats become float64 numpy arrays. Integer, boolean and complex inputs raise TypeError
    (a complex tensor cast to a real dtype would silently lose its imaginary part)."""
    if is_tensor(x):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        return x
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")
        return x
    if isinstance(x, (bool, np.bool_)) or isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be floating-point; got the integer {x!r}")
    if isinstance(x, numbers.Real):
        return np.asarray(float(x), dtype=np.float64)
    if isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} must hold floating-point values; got dtype {arr.dtype}")
        return arr
    raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(x).__name__}")


def check_like(y: Any, x: Any, name: str, xname: str = "x") -> Any:
    """Validate ``y`` as a floating array of the same kind, device and shape as ``x``."""
    y = check_float(y, name)
    if is_tensor(x) != is_tensor(y):
        kind = "a torch tensor" if is_tensor(x) else "a numpy array"
        raise TypeError(f"{name} must be {kind} like {xname}; got {type(y).__name__}")
    if is_tensor(x) and y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but {xname} is on {x.device}; move them to one device")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of {xname} {tuple(x.shape)}; got {tuple(y.shape)}")
    return y


def check_schedule(s):
    from .schedules import Schedule

    if not isinstance(s, Schedule):
        raise TypeError(f"s must be a diffmath.schedules.Schedule; got {type(s).__name__}")
    return s


def check_positive(value: Any, name: str, allow_array: bool = False) -> Any:
    """A finite float > 0 (or, with ``allow_array``, an array of them)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive number; got {value!r}")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0; got {name} = {v}")
        return v
    if allow_array and (is_tensor(value) or isinstance(value, np.ndarray)):
        real = (not value.is_complex() and value.dtype != torch.bool) if is_tensor(value) else value.dtype.kind in "fiu"
        if not real:  # complex values would be compared by real part, then cast to real silently
            raise TypeError(f"{name} must hold real positive numbers; got dtype {value.dtype}")
        bad = ~(value > 0) | (value == math.inf)
        if bool(bad.any()):
            first_bad = value[bad].reshape(-1)[0]
            raise ValueError(f"{name} must be finite and > 0; got {name} = {float(first_bad)}")
        return value
    raise TypeError(f"{name} must be a positive number; got {type(value).__name__}")


def check_t(t: Any, T: int, x: Any = None, name: str = "t", lo: int = 0) -> Any:
    """Validate a discrete timestep index.

    ``t`` may be a python int or an integer array/tensor of shape (B,) (a 0-d array counts as
    a scalar). It must lie in ``[lo, T)``; with ``x`` given, a batch of t must match
    ``x.shape[0]``. Returns a python int or an integer array/tensor of shape (B,).
    """
    if isinstance(t, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer timestep index; got the boolean {t!r}")
    if isinstance(t, numbers.Integral):
        ti = int(t)
        if not lo <= ti < T:
            raise ValueError(f"{name} must lie in [{lo}, {T}) for a schedule of {T} steps; got {name} = {ti}")
        return ti
    if is_tensor(t):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of timestep indices; got dtype {t.dtype}")
        if t.ndim == 0:
            return check_t(int(t.item()), T, x, name, lo)
        if t.ndim != 1:
            raise ValueError(f"{name} must be a scalar or have shape (B,); got shape {tuple(t.shape)}")
        if t.numel():
            tmin, tmax = int(t.min().item()), int(t.max().item())
            if tmin < lo or tmax >= T:
                bad = tmin if tmin < lo else tmax
                raise ValueError(f"{name} must lie in [{lo}, {T}) for a schedule of {T} steps; got {name} = {bad}")
    else:
        if isinstance(t, float) or (isinstance(t, np.ndarray) and not np.issubdtype(t.dtype, np.integer)):
            raise TypeError(f"{name} must be an integer timestep index; got {t!r:.60}")
        t = np.asarray(t)
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"{name} must be an integer timestep index; got dtype {t.dtype}")
        if t.ndim == 0:
            return check_t(int(t), T, x, name, lo)
        if t.ndim != 1:
            raise ValueError(f"{name} must be a scalar or have shape (B,); got shape {t.shape}")
        if t.size:
            tmin, tmax = int(t.min()), int(t.max())
            if tmin < lo or tmax >= T:
                bad = tmin if tmin < lo else tmax
                raise ValueError(f"{name} must lie in [{lo}, {T}) for a schedule of {T} steps; got {name} = {bad}")
    if x is not None:
        n = t.shape[0]
        if np.ndim(x) == 0 or x.shape[0] != n:
            raise ValueError(
                f"a batch of {n} timesteps {name} must match the batch of x; x has shape {tuple(np.shape(x))}"
            )
    return t


def check_pair(s: Any, a: Any, aname: str, b: Any, bname: str, t: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Validate the arguments of a schedule function of two arrays at step ``t``: ``s`` a
    Schedule, ``a`` a floating array, ``b`` an array like ``a`` (kind, device, shape) and ``t``
    a timestep index matching ``a``'s batch. Returns ``(a, b, t, upcast(a), upcast(b))``."""
    check_schedule(s)
    a = check_float(a, aname)
    b = check_like(b, a, bname, aname)
    t = check_t(t, s.num_timesteps, a)
    return a, b, t, upcast(a), upcast(b)


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


def check_steps(steps: Any, T: int, name: str = "steps") -> int:
    """An integer number of steps in [1, T]."""
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of steps; got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"{name} must lie in [1, {T}]; got {name} = {int(steps)}")
    return int(steps)


def check_eta(eta: Any) -> float:
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a real number >= 0; got {eta!r}")
    eta = float(eta)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0 (0 = deterministic DDIM, 1 = DDPM variance); got eta = {eta}")
    return eta


def check_variance(variance: str) -> None:
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' (beta_tilde) or 'large' (beta); got {variance!r}")


def check_clip(clip_x0):
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, (bool, np.bool_)) or not isinstance(clip_x0, numbers.Real):
        raise TypeError(f"clip_x0 must be None or a positive float; got {clip_x0!r}")
    c = float(clip_x0)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"clip_x0 must be None or a finite float > 0; got clip_x0 = {c}")
    return c


def check_time(t: Any, x: Any = None, name: str = "t", open_left: bool = False) -> Any:
    """Validate SDE time and return it as float64 in x's kind and device (or t's own kind
    when x is None): a 0-d value or shape (B,) matching x's batch. Range [0, 1], or (0, 1]
    with ``open_left``."""
    if isinstance(t, (bool, np.bool_)):
        raise TypeError(f"{name} must be a float SDE time in [0, 1]; got the boolean {t!r}")
    want_tensor = is_tensor(x) if x is not None else is_tensor(t)
    tt: Any  # a float64 tensor or numpy array/scalar, by want_tensor
    if is_tensor(t):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point SDE time in [0, 1]; got dtype {t.dtype}")
        tt = t.detach().to(torch.float64)
        if want_tensor and x is not None:
            tt = tt.to(x.device)
        elif not want_tensor:
            tt = tt.cpu().numpy()
    elif isinstance(t, numbers.Real):
        tt = float(t)
        tt = (
            torch.tensor(tt, dtype=torch.float64, device=x.device if x is not None else None)
            if want_tensor
            else np.float64(tt)
        )
    else:
        arr = np.asarray(t)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point SDE time in [0, 1]; got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        tt = torch.as_tensor(arr, device=x.device) if want_tensor else arr
    if tt.ndim > 1:
        raise ValueError(f"{name} must be a scalar or have shape (B,); got shape {tuple(tt.shape)}")
    lo_bad = (tt <= 0) if open_left else (tt < 0)
    bad = lo_bad | (tt > 1) | (tt != tt)
    if bool(bad.any()):
        vals = tt[bad] if tt.ndim else tt
        v = float(vals.reshape(-1)[0]) if tt.ndim else float(vals)
        rng = "(0, 1]" if open_left else "[0, 1]"
        raise ValueError(f"{name} must lie in {rng} (SDE time, T = 1); got {name} = {v}")
    if x is not None and tt.ndim == 1:
        if np.ndim(x) == 0 or x.shape[0] != tt.shape[0]:
            raise ValueError(
                f"a batch of {tt.shape[0]} times {name} does not match x (a batch of times {name} must have shape "
                f"(B,) = ({np.shape(x)[0] if np.ndim(x) else 0},)); x has shape {tuple(np.shape(x))}"
            )
    return tt


def check_signal(s: Any, t: Any, what: str) -> None:
    """abar_t = 0 (zero terminal SNR) carries no signal: x_t is pure noise and x0 cannot be
    recovered from eps (Lin et al. 2024 use v-prediction there). Raise instead of a NaN."""
    tn = np.asarray(t.detach().cpu() if hasattr(t, "detach") else t)
    zero = s.alphas_cumprod[tn] == 0
    if np.any(zero):
        bad = int(tn.reshape(-1)[np.argmax(zero.reshape(-1))])
        raise ValueError(
            f"{what} is undefined at t = {bad}, where alphas_cumprod = 0 (zero terminal SNR, or below float64's "
            "range): x_t holds no "
            "signal; predict v (x0_from_v) or x0 there instead of eps"
        )


def check_tol(v, name):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and float(v) > 0):
        raise ValueError(f"{name} must be a finite float > 0; got {name} = {v!r}")
    return float(v)


def check_eps(sde, eps):
    if eps is None:
        return sde.default_eps
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not (0 < float(eps) < sde.T):
        raise ValueError(f"eps (the stopping time) must lie in (0, {sde.T}); got eps = {eps!r}")
    return float(eps)


def check_dt(dt: Any, reverse: bool | None = None) -> float:
    """dt as a float: finite and non-zero; with ``reverse`` True (a ReverseSDE, integrated
    from t = 1 towards 0) it must be < 0, with ``reverse`` False (a forward SDE) > 0."""
    if isinstance(dt, (bool, np.bool_)) or not isinstance(dt, numbers.Real):
        raise TypeError(f"dt must be a real number (negative for reverse time); got {dt!r}")
    dt = float(dt)
    if not (math.isfinite(dt) and dt != 0):
        raise ValueError(f"dt must be finite and non-zero (negative for reverse time); got dt = {dt}")
    if reverse is True and dt > 0:
        raise ValueError(
            f"dt must be < 0 for a ReverseSDE (it runs backward in time, from t = 1 towards 0); got dt = {dt}"
        )
    if reverse is False and dt < 0:
        raise ValueError(f"dt must be > 0 for a forward SDE (it runs forward in time); got dt = {dt}")
    return dt


def check_sde(sde):
    from .sde import SDE

    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffmath.sde.SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")


def check_pc_args(snr, alpha, n_corrector_steps):
    """The predictor-corrector settings shared by ``sample_pc`` and the oracle's
    ``exact_sde_output``: snr > 0, alpha > 0 (finite), n_corrector_steps an integer >= 0."""
    snr = check_positive(snr, "snr")
    alpha = check_positive(alpha, "alpha")
    if (
        isinstance(n_corrector_steps, bool)
        or not isinstance(n_corrector_steps, (int, np.integer))
        or n_corrector_steps < 0
    ):
        raise ValueError(f"n_corrector_steps must be an integer >= 0; got {n_corrector_steps!r}")
    return snr, alpha, int(n_corrector_steps)


def check_int(v: Any, name: str, lo: int, hi: int) -> int:
    if type(v) is int and lo <= v < hi:
        return v
    if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point() and v.dtype != torch.bool:
        v = int(v.item())
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [{lo}, {hi}); got {v!r}")
    v = int(v)
    if not lo <= v < hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}); got {name} = {v}")
    return v
