"""50-digit mpmath references for one DDPM / DDIM scheduler step (the diffusers adapter's tests).

Written from the papers' definitions, element by element, from the exact float64 (or float32)
inputs: abar_t = prod_{j <= t} (1 - beta_j) as a product, no tables, no cancellation-free
forms. Shared with benchmarks/diffusers_accuracy.py, which prints docs/diffusers.md's table.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

DPS = 50


def abar(betas, t):
    """prod_{j <= t} (1 - beta_j) in mpmath; 1 for t = -1."""
    p = mp.mpf(1)
    for b in list(betas)[: t + 1]:
        p *= 1 - mp.mpf(float(b))
    return p


def _flat(x):
    a = x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    return a.reshape(-1).tolist(), a.shape


def _x0_eps(x, m, a, prediction):
    """(x0, eps) from the model output m at abar = a (DDPM eq. 15; Salimans & Ho 2022)."""
    sa, sb = mp.sqrt(a), mp.sqrt(1 - a)
    if prediction == "epsilon":
        return (x - sb * m) / sa, m
    if prediction == "v_prediction":
        return sa * x - sb * m, sa * m + sb * x
    return m, (x - sa * m) / sb


def _threshold_rows(x0_rows, ratio, max_value):
    """Imagen's dynamic thresholding per row (list of lists of mpf): s = clamp(quantile(|x0|,
    ratio), 1, max_value), the quantile interpolating linearly between order statistics."""
    out = []
    for row in x0_rows:
        srt = sorted(abs(v) for v in row)
        pos = mp.mpf(ratio) * (len(srt) - 1)
        lo = int(mp.floor(pos))
        hi = min(lo + 1, len(srt) - 1)
        q = srt[lo] + (pos - lo) * (srt[hi] - srt[lo])
        s = min(max(q, mp.mpf(1)), mp.mpf(max_value))
        out.append([min(max(v, -s), s) / s for v in row])
    return out


def _prepare(x, m, a, prediction, clip, threshold):
    xs, shape = _flat(x)
    ms, _ = _flat(m)
    X = [mp.mpf(v) for v in xs]
    M = [mp.mpf(v) for v in ms]
    pairs = [_x0_eps(xv, mv, a, prediction) for xv, mv in zip(X, M)]
    x0 = [p[0] for p in pairs]
    eps = [p[1] for p in pairs]
    if threshold is not None:
        B = shape[0]
        n = len(x0) // B
        rows = _threshold_rows([x0[i * n : (i + 1) * n] for i in range(B)], *threshold)
        x0 = [v for r in rows for v in r]
    elif clip is not None:
        c = mp.mpf(clip)
        x0 = [min(max(v, -c), c) for v in x0]
    return X, x0, eps, shape


def ddim_step(
    betas,
    x,
    m,
    t,
    t_prev,
    *,
    eta=0.0,
    noise=None,
    prediction="epsilon",
    clip=None,
    threshold=None,
    final_abar=None,
    use_clipped=False,
    dps=DPS,
):
    """x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar')/(1 - abar_t)) sqrt(1 - abar_t/abar')      (DDIM eq. 12, 16);
    abar' = abar_{t_prev}, or ``final_abar`` (default 1) for t_prev < 0. Returns
    (x_prev, x0) as float64 arrays of x's shape."""
    with mp.workdps(dps):
        a = abar(betas, t)
        if t_prev >= 0:
            ap = abar(betas, t_prev)
        else:
            ap = mp.mpf(1) if final_abar is None else abar(betas, final_abar)
        X, x0, eps, shape = _prepare(x, m, a, prediction, clip, threshold)
        if use_clipped:
            eps = [(xv - mp.sqrt(a) * x0v) / mp.sqrt(1 - a) for xv, x0v in zip(X, x0)]
        sigma2 = mp.mpf(eta) ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
        sigma = mp.sqrt(sigma2)
        c2 = 1 - ap - sigma2  # >= 0 for eta <= 1; exactly 0 at eta = 1, abar_t = 0 (zero terminal SNR)
        c_eps = mp.sqrt(c2 if c2 > 0 or c2 < -(mp.mpf(10) ** (10 - dps)) else 0)
        Z = [mp.mpf(v) for v in _flat(noise)[0]] if noise is not None else [mp.mpf(0)] * len(X)
        out = [mp.sqrt(ap) * x0v + c_eps * e + sigma * z for x0v, e, z in zip(x0, eps, Z)]
        return (np.array([float(v) for v in out]).reshape(shape), np.array([float(v) for v in x0]).reshape(shape))


def ddpm_step(
    betas,
    x,
    m,
    t,
    t_prev,
    *,
    noise=None,
    variance="fixed_small",
    prediction="epsilon",
    clip=None,
    threshold=None,
    predicted_variance=None,
    dps=DPS,
):
    """One step of DDPM on the chain t -> t_prev (abar' = 1 for t_prev = -1), with
    beta' = 1 - abar_t/abar' (Improved DDPM's respacing):

    mean = sqrt(abar') beta'/(1 - abar_t) x0 + sqrt(1 - beta') (1 - abar')/(1 - abar_t) x_t   (DDPM eq. 7)
    var  = (1 - abar')/(1 - abar_t) beta' (small) | beta' (large) | predicted (learned) |
           exp(frac log beta' + (1 - frac) log var_small), frac = (v + 1)/2   (Improved DDPM eq. 15)
    x_{t'} = mean + sqrt(var) z, and no noise for t_prev = -1 (DDPM Alg. 2).
    Returns (x_prev, x0) as float64 arrays."""
    with mp.workdps(dps):
        a = abar(betas, t)
        ap = abar(betas, t_prev)
        beta = 1 - a / ap
        X, x0, _, shape = _prepare(x, m, a, prediction, clip, threshold)
        c1 = mp.sqrt(ap) * beta / (1 - a)
        c2 = mp.sqrt(1 - beta) * (1 - ap) / (1 - a)
        out = [c1 * x0v + c2 * xv for x0v, xv in zip(x0, X)]
        if t_prev >= 0 and noise is not None:
            small = (1 - ap) / (1 - a) * beta
            Z = [mp.mpf(v) for v in _flat(noise)[0]]
            if variance in ("fixed_small", "fixed_small_log"):
                stds = [mp.sqrt(small)] * len(Z)
            elif variance in ("fixed_large", "fixed_large_log"):
                stds = [mp.sqrt(beta)] * len(Z)
            elif variance == "learned":
                stds = [mp.sqrt(mp.mpf(v)) for v in _flat(predicted_variance)[0]]
            else:
                fr = [(mp.mpf(v) + 1) / 2 for v in _flat(predicted_variance)[0]]
                stds = [mp.exp((f * mp.log(beta) + (1 - f) * mp.log(small)) / 2) for f in fr]
            out = [o + sd * z for o, sd, z in zip(out, stds, Z)]
        return (np.array([float(v) for v in out]).reshape(shape), np.array([float(v) for v in x0]).reshape(shape))


def rel_error(ours, ref) -> float:
    """Norm-wise relative error ||ours - ref|| / ||ref|| in float64."""
    o = ours.detach().cpu().double().numpy() if hasattr(ours, "detach") else np.asarray(ours, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(o - r) / np.linalg.norm(r))
