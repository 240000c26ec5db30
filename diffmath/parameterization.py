"""Conversions between the network targets eps, x0, v and the score (for x_t at step t).

With x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4):

    x0    = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps                 (DDPM eq. 15)
    v     = sqrt(abar_t) eps - sqrt(1 - abar_t) x0                      (Salimans & Ho 2022, Sec. 4)
    x0    = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    eps   = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    score = grad_{x_t} log q(x_t | x0) = -eps / sqrt(1 - abar_t)        (Song et al. 2021, eq. 15-16)
"""

from __future__ import annotations

import numpy as np

from ._array import ArrayT, TimeLike, gather, restore, upcast, widen_for_tables
from .checks import check_float, check_pair, check_schedule, check_signal, check_t
from .schedules import Schedule

#: the tables x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps reads: 1/sqrt(abar) overflows float32
#: for abar < ~1e-77, where a float32 step computes in float64 instead (``widen_for_tables``)
X0_TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")

__all__ = [
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_from_v",
    "eps_from_v",
    "score_from_eps",
    "eps_from_score",
    "x0_from_prediction",
    "eps_from_prediction",
]


def _t_numpy(t: TimeLike) -> np.ndarray:
    return np.asarray(t.detach().cpu() if hasattr(t, "detach") else t)


def x0_from_eps(s: Schedule, x_t: ArrayT, t: TimeLike, eps: ArrayT) -> ArrayT:
    """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps   (DDPM eq. 15). Shapes (B, ...).
    Raises ValueError where abar_t = 0 (zero terminal SNR), where x0 is not determined.
    float32 input where 1/sqrt(abar_t) exceeds float32's range (abar_t < ~1e-77) is computed in
    float64 and rounded once: x0 in float32, or +-inf where |x0| is beyond its range, never NaN."""
    x_t, eps, t, xc, ec = check_pair(s, x_t, "x_t", eps, "eps", t)
    xc, ec = widen_for_tables(s, t, X0_TABLES, xc, ec)
    check_signal(s, t, "x0_from_eps")
    return restore(x0_from_eps_prepared(s, xc, t, ec), x_t)


def x0_from_eps_prepared(s: Schedule, xc: ArrayT, t: TimeLike, ec: ArrayT) -> ArrayT:
    """``x0_from_eps`` on inputs already validated and upcast, with abar_t > 0 checked by the
    caller (``check_signal``; the samplers check every step's t once, before their loop)."""
    return gather(s.sqrt_recip_alphas_cumprod, t, xc) * xc - gather(s.sqrt_recipm1_alphas_cumprod, t, xc) * ec


def eps_from_x0(s: Schedule, x_t: ArrayT, t: TimeLike, x0: ArrayT) -> ArrayT:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1),

    DDPM eq. 4, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, solved for eps (the inverse of
    ``x0_from_eps``, DDPM eq. 15). At abar_t = 0 (zero terminal SNR) eps = x_t exactly, returned
    as such. float32 input where a coefficient does not fit float32 (abar_t < ~1e-77, or
    1 - abar_t below its smallest subnormal) is computed in float64 and rounded once, never NaN."""
    x_t, x0, t, xc, x0c = check_pair(s, x_t, "x_t", x0, "x0", t)
    xc, x0c = widen_for_tables(s, t, X0_TABLES + ("sqrt_one_minus_alphas_cumprod",), xc, x0c)
    if np.any(s.alphas_cumprod[_t_numpy(t)] == 0):
        # (x_t - sqrt(abar) x0)/sqrt(1 - abar) without the inf/inf of the second form
        out = (xc - gather(s.sqrt_alphas_cumprod, t, xc) * x0c) / gather(s.sqrt_one_minus_alphas_cumprod, t, xc)
        return restore(out, x_t)
    out = (gather(s.sqrt_recip_alphas_cumprod, t, xc) * xc - x0c) / gather(s.sqrt_recipm1_alphas_cumprod, t, xc)
    return restore(out, x_t)


def v_from_x0_eps(s: Schedule, t: TimeLike, x0: ArrayT, eps: ArrayT) -> ArrayT:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho 2022, "Progressive distillation", Sec. 4)."""
    x0, eps, t, x0c, ec = check_pair(s, x0, "x0", eps, "eps", t)
    out = gather(s.sqrt_alphas_cumprod, t, x0c) * ec - gather(s.sqrt_one_minus_alphas_cumprod, t, x0c) * x0c
    return restore(out, x0)


def x0_from_v(s: Schedule, x_t: ArrayT, t: TimeLike, v: ArrayT) -> ArrayT:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v   (Salimans & Ho 2022)."""
    x_t, v, t, xc, vc = check_pair(s, x_t, "x_t", v, "v", t)
    out = gather(s.sqrt_alphas_cumprod, t, xc) * xc - gather(s.sqrt_one_minus_alphas_cumprod, t, xc) * vc
    return restore(out, x_t)


def eps_from_v(s: Schedule, x_t: ArrayT, t: TimeLike, v: ArrayT) -> ArrayT:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t   (Salimans & Ho 2022)."""
    x_t, v, t, xc, vc = check_pair(s, x_t, "x_t", v, "v", t)
    out = gather(s.sqrt_alphas_cumprod, t, xc) * vc + gather(s.sqrt_one_minus_alphas_cumprod, t, xc) * xc
    return restore(out, x_t)


def score_from_eps(s: Schedule, t: TimeLike, eps: ArrayT) -> ArrayT:
    """score = grad_x log q(x_t | x0) = -eps / sqrt(1 - abar_t)   (Song et al. 2021, App. B).
    float32 input where sqrt(1 - abar_t) underflows float32 (betas ~1e-90) is computed in
    float64 and rounded once (0 / 0 was NaN)."""
    check_schedule(s)
    eps = check_float(eps, "eps")
    t = check_t(t, s.num_timesteps, eps)
    (ec,) = widen_for_tables(s, t, ("sqrt_one_minus_alphas_cumprod",), upcast(eps))
    return restore(-ec / gather(s.sqrt_one_minus_alphas_cumprod, t, ec), eps)


def eps_from_score(s: Schedule, t: TimeLike, score: ArrayT) -> ArrayT:
    """eps = -sqrt(1 - abar_t) * score, the inverse of ``score_from_eps``: the score of
    q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) is -(x_t - sqrt(abar_t) x0) / (1 - abar_t)
    = -eps / sqrt(1 - abar_t) (DDPM eq. 4; Song et al. 2021, App. B)."""
    check_schedule(s)
    score = check_float(score, "score")
    t = check_t(t, s.num_timesteps, score)
    sc = upcast(score)
    return restore(-gather(s.sqrt_one_minus_alphas_cumprod, t, sc) * sc, score)


def x0_from_prediction(prediction: str, s: Schedule, x_t: ArrayT, t: TimeLike, pred: ArrayT) -> ArrayT:
    """x0 from a network's output ``pred`` of kind ``prediction``: "eps" (``x0_from_eps``), "x0"
    (``pred`` itself) or "v" (``x0_from_v``). Shapes (B, ...)."""
    if prediction == "eps":
        return x0_from_eps(s, x_t, t, pred)
    if prediction == "x0":
        return pred
    return x0_from_v(s, x_t, t, pred)


def eps_from_prediction(prediction: str, s: Schedule, x_t: ArrayT, t: TimeLike, pred: ArrayT) -> ArrayT:
    """eps from a network's output ``pred`` of kind ``prediction``: "eps" (``pred`` itself), "x0"
    (``eps_from_x0``) or "v" (``eps_from_v``). Shapes (B, ...)."""
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return eps_from_x0(s, x_t, t, pred)
    return eps_from_v(s, x_t, t, pred)
