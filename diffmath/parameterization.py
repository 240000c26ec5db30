"""Conversions between the network targets eps, x0, v and the score (for x_t at step t).

With x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4):

    x0    = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps                 (DDPM eq. 15)
    v     = sqrt(abar_t) eps - sqrt(1 - abar_t) x0                      (Salimans & Ho 2022, Sec. 4)
    x0    = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    eps   = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    score = grad_{x_t} log q(x_t | x0) = -eps / sqrt(1 - abar_t)        (Song et al. 2021, eq. 15-16)
"""

from __future__ import annotations

from ._array import check_float, check_like, check_schedule, check_t, gather, restore, upcast
from .schedules import Schedule

__all__ = ["x0_from_eps", "eps_from_x0", "v_from_x0_eps", "x0_from_v", "eps_from_v", "score_from_eps", "eps_from_score"]


def _prep(s, a, an, b, bn, t):
    check_schedule(s)
    a = check_float(a, an)
    b = check_like(b, a, bn, an)
    t = check_t(t, s.num_timesteps, a)
    return a, b, t, upcast(a), upcast(b)


def x0_from_eps(s: Schedule, x_t, t, eps):
    """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps   (DDPM eq. 15). Shapes (B, ...)."""
    x_t, eps, t, xc, ec = _prep(s, x_t, "x_t", eps, "eps", t)
    out = gather(s.sqrt_recip_alphas_cumprod, t, xc) * xc - gather(s.sqrt_recipm1_alphas_cumprod, t, xc) * ec
    return restore(out, x_t)


def eps_from_x0(s: Schedule, x_t, t, x0):
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
    x_t, x0, t, xc, x0c = _prep(s, x_t, "x_t", x0, "x0", t)
    out = (gather(s.sqrt_recip_alphas_cumprod, t, xc) * xc - x0c) / gather(s.sqrt_recipm1_alphas_cumprod, t, xc)
    return restore(out, x_t)


def v_from_x0_eps(s: Schedule, t, x0, eps):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho 2022, "Progressive distillation", Sec. 4)."""
    x0, eps, t, x0c, ec = _prep(s, x0, "x0", eps, "eps", t)
    out = gather(s.sqrt_alphas_cumprod, t, x0c) * ec - gather(s.sqrt_one_minus_alphas_cumprod, t, x0c) * x0c
    return restore(out, x0)


def x0_from_v(s: Schedule, x_t, t, v):
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v   (Salimans & Ho 2022)."""
    x_t, v, t, xc, vc = _prep(s, x_t, "x_t", v, "v", t)
    out = gather(s.sqrt_alphas_cumprod, t, xc) * xc - gather(s.sqrt_one_minus_alphas_cumprod, t, xc) * vc
    return restore(out, x_t)


def eps_from_v(s: Schedule, x_t, t, v):
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t   (Salimans & Ho 2022)."""
    x_t, v, t, xc, vc = _prep(s, x_t, "x_t", v, "v", t)
    out = gather(s.sqrt_alphas_cumprod, t, xc) * vc + gather(s.sqrt_one_minus_alphas_cumprod, t, xc) * xc
    return restore(out, x_t)


def score_from_eps(s: Schedule, t, eps):
    """score = grad_x log q(x_t | x0) = -eps / sqrt(1 - abar_t)   (Song et al. 2021, App. B)."""
    check_schedule(s)
    eps = check_float(eps, "eps")
    t = check_t(t, s.num_timesteps, eps)
    ec = upcast(eps)
    return restore(-ec / gather(s.sqrt_one_minus_alphas_cumprod, t, ec), eps)


def eps_from_score(s: Schedule, t, score):
    """eps = -sqrt(1 - abar_t) * score, the inverse of ``score_from_eps``."""
    check_schedule(s)
    score = check_float(score, "score")
    t = check_t(t, s.num_timesteps, score)
    sc = upcast(score)
    return restore(-gather(s.sqrt_one_minus_alphas_cumprod, t, sc) * sc, score)
