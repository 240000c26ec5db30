"""Gaussian divergences and log-likelihoods: the building blocks of the VLB.

All functions are elementwise (or batched over leading dimensions) and accept numpy arrays,
torch tensors and python floats mixed: if any input is a tensor, the others are converted to
its device; the result has the broadcast shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._array import Array, backend, is_tensor

__all__ = ["normal_kl", "gaussian_kl", "normal_log_prob", "discretized_gaussian_log_likelihood", "log_diff_ndtr"]

LOG_2PI = math.log(2.0 * math.pi)


def _common(names, *xs):
    """Bring the inputs to one kind/device/dtype: tensors if any input is one (on its device),
    else numpy. Returns (inputs, result dtype): the promoted floating dtype of the tensors (or
    of the numpy arrays of ndim > 0; python and 0-d scalars do not widen it), float64 where
    none is floating. The math runs in that dtype, float16/bfloat16 in float32, and the result
    is cast back to it."""
    tens = [x for x in xs if is_tensor(x)]
    out = []
    if tens:
        dev = tens[0].device
        first = next(n for n, x in zip(names, xs) if is_tensor(x))
        for n, x in zip(names, xs):
            if is_tensor(x) and x.device != dev:
                raise ValueError(f"{n} is on {x.device} but {first} is on {dev}")
        for n, x in zip(names, xs):
            if is_tensor(x) and (x.is_complex() or x.dtype == torch.bool):
                # .to(dtype) would drop the imaginary part (or turn booleans into 0/1) silently
                raise TypeError(f"{n} must be a real-valued tensor; got dtype {x.dtype}")
        floats = [x.dtype for x in tens if x.is_floating_point()]
        result = floats[0] if floats else torch.float64
        for d in floats[1:]:
            result = torch.promote_types(result, d)
        dtype = torch.float32 if result in (torch.float16, torch.bfloat16) else result
        for n, x in zip(names, xs):
            if not is_tensor(x):
                # through numpy: a python float stays float64 (torch.as_tensor would round it to float32)
                arr = np.asarray(x)
                if arr.dtype.kind not in "fiu":
                    raise TypeError(f"{n} must be real-valued; got {type(x).__name__}")
                x = arr
            out.append(torch.as_tensor(x, device=dev).to(dtype))
        return out, result
    arrs = []
    for n, x in zip(names, xs):
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{n} must be a real array; got dtype {a.dtype}")
        arrs.append(a)
    float_arrs = [a.dtype for a in arrs if a.dtype.kind == "f" and a.ndim > 0]
    nresult = np.result_type(*float_arrs) if float_arrs else np.dtype(np.float64)
    ndtype = np.dtype(np.float32) if nresult == np.float16 else nresult
    return [a.astype(ndtype, copy=False) for a in arrs], nresult


def _check_logvar(**logvars):
    """Log-variances must be finite: NaN, +inf (infinite variance) and -inf (zero variance)
    would give NaN or +-inf, not a number."""
    for n, lv in logvars.items():
        bad = ~((lv == lv) & (lv != math.inf) & (lv != -math.inf))
        if bool(bad.any()):
            raise ValueError(
                f"{n} must be a finite log-variance (variance in (0, inf)); got {n} = {float(lv[bad].reshape(-1)[0])}"
            )


def _restore(out, dtype):
    if is_tensor(out):
        return out.to(dtype) if isinstance(dtype, torch.dtype) else out
    return np.asarray(out).astype(dtype, copy=False)


def _expm1_minus_x(d):
    """e^d - 1 - d without cancellation: d^2 * sum_{j>=0} d^j/(j+2)! (Horner, 18 terms) for
    |d| < 0.5, where the truncation error is below 0.5^18/20! relative; expm1(d) - d elsewhere
    (+inf for d = +inf, where a difference of two finite log-variances overflows, not inf - inf)."""
    ops = backend(d)
    small = ops.abs(d) < 0.5
    ds = ops.where(small, d, 0.0)
    p = ds * 0 + 1.0 / math.factorial(19)
    for j in range(16, -1, -1):
        p = p * ds + 1.0 / math.factorial(j + 2)
    dl = ops.where(small | (d == math.inf), 1.0, d)
    with np.errstate(over="ignore"):  # expm1 overflowing to inf is the value (the KL is +inf)
        return ops.where(small, ds * ds * p, ops.where(d == math.inf, math.inf, ops.expm1(dl) - dl))


def _scaled_square(diff, logvar):
    """diff^2 e^{-logvar}, the quadratic term of a Gaussian log-density or KL, never NaN for
    finite input: the plain product (kept wherever it is finite and nonzero, or diff = 0)
    overflows or underflows for extreme log-variances (0 * e^800 = NaN for diff = 0 and
    logvar = -800; inf * 0 for diff = 1e160, logvar = 700, where the value is 1e16); there
    (diff e^{-logvar/2})^2 is used instead, and exactly 0 where diff = 0."""
    ops = backend(diff)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # the cases handled here
        q = diff**2 * ops.exp(-logvar)
        alt = ops.where(diff == 0, 0.0, (diff * ops.exp(-0.5 * logvar)) ** 2)
    bad = (q != q) | (q == math.inf) | ((q == 0) & (diff != 0))
    return ops.where(bad, alt, q)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats.

    KL = 1/2 (logvar2 - logvar1 + e^{logvar1 - logvar2} - 1 + (mean1 - mean2)^2 e^{-logvar2})
    (e.g. DDPM App. / guided-diffusion ``normal_kl``). The term e^d - 1 - d (d = logvar1 -
    logvar2) is evaluated without cancellation, so nearly equal Gaussians keep full relative
    precision. Log-variances must be finite (ValueError otherwise); finite input never gives
    NaN: a KL beyond the float range is +inf (normal_kl(0, 0, 0, -800) = +inf).
    """
    (m1, lv1, m2, lv2), dtype = _common(("mean1", "logvar1", "mean2", "logvar2"), mean1, logvar1, mean2, logvar2)
    _check_logvar(logvar1=lv1, logvar2=lv2)
    ops = backend(m1)
    with np.errstate(over="ignore"):  # lv1 - lv2 beyond the float range is +-inf, handled
        d = lv1 - lv2
    # (e^d - 1 - d)/2; where d overflowed to -inf, e^d = 0 and -(1 + d)/2 = (lv2 - lv1)/2 - 1/2 is finite
    half = ops.where(d == -math.inf, (0.5 * lv2 - 0.5 * lv1) - 0.5, 0.5 * _expm1_minus_x(d))
    kl = half + 0.5 * _scaled_square(m1 - m2, lv2)  # = 0.5 (a + b), halving is exact
    return _restore(kl, dtype)


def normal_log_prob(x, mean, logvar):
    """log N(x; mean, e^logvar) = -1/2 (log 2 pi + logvar + (x - mean)^2 e^{-logvar}), elementwise:
    the logarithm of the normal density (1 / sqrt(2 pi sigma^2)) exp(-(x - mu)^2 / (2 sigma^2)),
    sigma^2 = e^logvar (e.g. Bishop 2006, "Pattern Recognition and Machine Learning", eq. 1.46).
    logvar must be finite (ValueError otherwise); finite input never gives NaN (x = mean with
    logvar = -800 gives 399.08, not 0 * inf)."""
    (x, m, lv), dtype = _common(("x", "mean", "logvar"), x, mean, logvar)
    _check_logvar(logvar=lv)
    return _restore(-0.5 * (LOG_2PI + lv + _scaled_square(x - m, lv)), dtype)


def gaussian_kl(mu1, cov1, mu2, cov2):
    """KL(N(mu1, cov1) || N(mu2, cov2)) for full covariances, batched over leading dims.

    KL = 1/2 (tr(S2^-1 S1) + (mu2 - mu1)^T S2^-1 (mu2 - mu1) - k + log det S2 - log det S1)

    the textbook closed form: KL = E_p[log p(x) - log q(x)] with the k-variate normal
    log-density log N(x; mu, S) = -1/2 (k log 2 pi + log det S + (x - mu)^T S^-1 (x - mu)) and the
    mean of a quadratic form under p = N(mu1, S1), E_p[(x - m)^T A (x - m)] = tr(A S1) +
    (mu1 - m)^T A (mu1 - m) (Petersen & Pedersen, "The Matrix Cookbook", Sec. 8.2). For
    diagonal covariances it is ``normal_kl`` summed over the k coordinates.

    Computed through Cholesky factors L1, L2 and triangular solves, never an explicit
    inverse: tr(S2^-1 S1) = ||L2^-1 L1||_F^2, the quadratic form = ||L2^-1 (mu2 - mu1)||^2,
    log det S = 2 sum log diag L. mu: (..., k); cov: (..., k, k), symmetric positive definite.
    """
    (m1, c1, m2, c2), dtype = _common(("mu1", "cov1", "mu2", "cov2"), mu1, cov1, mu2, cov2)
    for n, m, c in (("1", m1, c1), ("2", m2, c2)):
        if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
            raise ValueError(f"cov{n} must have shape (..., k, k); got {tuple(c.shape)}")
        if m.ndim < 1 or m.shape[-1] != c.shape[-1]:
            raise ValueError(f"mu{n} must have shape (..., {c.shape[-1]}) to match cov{n}; got {tuple(m.shape)}")
    k = c1.shape[-1]
    if c2.shape[-1] != k:
        raise ValueError(f"cov1 and cov2 must have the same dimension; got {k} and {c2.shape[-1]}")
    L1 = _cholesky(c1, "cov1")
    L2 = _cholesky(c2, "cov2")
    if is_tensor(m1):
        batch = torch.broadcast_shapes(L1.shape[:-2], L2.shape[:-2], m1.shape[:-1], m2.shape[:-1])
        L1b, L2b = L1.expand(*batch, k, k), L2.expand(*batch, k, k)
        A = torch.linalg.solve_triangular(L2b, L1b, upper=False)
        diff = (m2 - m1).expand(*batch, k).unsqueeze(-1)
        z = torch.linalg.solve_triangular(L2b, diff, upper=False)
        tr = (A**2).sum(dim=(-1, -2))
        quad = (z**2).sum(dim=(-1, -2))
        logdet = 2 * (
            torch.log(torch.diagonal(L2b, dim1=-2, dim2=-1)).sum(-1)
            - torch.log(torch.diagonal(L1b, dim1=-2, dim2=-1)).sum(-1)
        )
    else:
        batch = np.broadcast_shapes(L1.shape[:-2], L2.shape[:-2], m1.shape[:-1], m2.shape[:-1])
        L1b = np.broadcast_to(L1, batch + (k, k))
        L2b = np.broadcast_to(L2, batch + (k, k))
        diff = np.broadcast_to(m2 - m1, batch + (k,))[..., None]
        # batched solves with the triangular factor L2 (LAPACK gesv on each matrix of the batch)
        A = np.linalg.solve(L2b, L1b)
        z = np.linalg.solve(L2b, diff)
        tr = (A**2).sum(axis=(-1, -2))
        quad = (z**2).sum(axis=(-1, -2))
        logdet = 2 * (
            np.log(np.diagonal(L2b, axis1=-2, axis2=-1)).sum(-1) - np.log(np.diagonal(L1b, axis1=-2, axis2=-1)).sum(-1)
        )
    return _restore(0.5 * (tr + quad - k + logdet), dtype)


def _cholesky(c, name):
    if is_tensor(c):
        atol = 1e-12 * float(c.abs().max()) if c.numel() else 0.0  # round-off in near-zero entries
        if not bool(torch.allclose(c, c.transpose(-1, -2), rtol=1e-6, atol=atol)):
            raise ValueError(f"{name} must be symmetric")
        L, info = torch.linalg.cholesky_ex(c)
        if bool((info != 0).any()):
            raise ValueError(f"{name} must be positive definite (its Cholesky factorisation failed)")
        return L
    atol = 1e-12 * float(np.abs(c).max()) if c.size else 0.0  # round-off in near-zero entries
    if not np.allclose(c, np.swapaxes(c, -1, -2), rtol=1e-6, atol=atol):
        raise ValueError(f"{name} must be symmetric")
    try:
        return np.linalg.cholesky(c)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"{name} must be positive definite (its Cholesky factorisation failed)") from e


def log_diff_ndtr(a, b):
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails and for narrow intervals.

    b < 0: log Phi(b) + log1mexp(log Phi(a) - log Phi(b)); a > 0: the mirror image
    log(Phi(-a) - Phi(-b)); a <= 0 <= b: log1p(-(Phi(a) + Phi(-b))) when the tails are small,
    else log((erf(b/sqrt2) + erf(-a/sqrt2)) / 2), a sum of non-negatives. a = -inf and b = +inf are allowed.
    """
    ops = backend(a)
    # mirror the upper-tail case (a > 0) onto the lower tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    upper = a > 0
    lo = ops.where(upper, -b, a)
    hi = ops.where(upper, -a, b)
    straddle = (lo <= 0) & (hi >= 0)
    # both in the lower tail (hi <= 0): log Phi(hi) + log1mexp(log Phi(lo) - log Phi(hi))
    hi_t = ops.where(straddle, 0.0, hi)
    lhi = ops.log_ndtr(hi_t)
    y = ops.log_ndtr(ops.where(straddle, -1.0, lo)) - lhi  # <= 0
    near = y > -math.log(2.0)
    tail = lhi + ops.where(
        near, ops.log(-ops.expm1(ops.where(near, y, -1.0))), ops.log1p(-ops.exp(ops.where(near, -1.0, y)))
    )
    # straddling zero: the two tails t = Phi(lo) + Phi(-hi) are each <= 1/2. For t < 1/2,
    # log1p(-t) keeps full relative precision when the bin holds nearly all the mass; else
    # (erf(hi/sqrt2) + erf(-lo/sqrt2)) / 2, a sum of non-negatives, for narrow bins.
    lo_s = ops.where(straddle, lo, -1.0)
    hi_s = ops.where(straddle, hi, 1.0)
    tails = ops.ndtr(lo_s) + ops.ndtr(-hi_s)
    small = tails < 0.5
    r2 = math.sqrt(2.0)
    mid = ops.where(
        small,
        ops.log1p(-ops.where(small, tails, 0.0)),
        ops.log(0.5 * (ops.erf(ops.where(small, 1.0, hi_s) / r2) + ops.erf(-ops.where(small, -1.0, lo_s) / r2))),
    )
    return ops.where(straddle, mid, tail)


def discretized_gaussian_log_likelihood(
    x: Array | float, mean: Array | float, log_scale: Array | float, bins: int = 256
) -> Array:
    """log P(x) for data on the grid {-1, -1 + 2/(bins-1), ..., 1} under a Gaussian decoder
    N(mean, e^{2 log_scale}) discretised into bins of half-width delta = 1/(bins - 1)
    (DDPM Sec. 3.3, eq. 13): P(x) = Phi((x + delta - mean)/sigma) - Phi((x - delta - mean)/sigma),
    with the edge bins taking the tails (x = -1: Phi((x + delta - mean)/sigma);
    x = 1: 1 - Phi((x - delta - mean)/sigma)).

    Uses exact normal CDFs in log space (``log_ndtr``; see ``log_diff_ndtr``), not
    guided-diffusion's tanh approximation of Phi, which is off by up to 100% relative in the
    far tails. Elementwise; returns log-probabilities in nats of the broadcast shape.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2; got {bins!r}")
    (xa, m, ls), dtype = _common(("x", "mean", "log_scale"), x, mean, log_scale)
    if bool((xa < -1 - 1e-6).any()) or bool((xa > 1 + 1e-6).any()):
        raise ValueError(
            f"x must lie in [-1, 1] (data scaled from {bins} levels); got range [{float(xa.min())}, {float(xa.max())}]"
        )
    ops = backend(xa)
    delta = 1.0 / (bins - 1)
    inv_s = ops.exp(-ls)
    c = xa - m
    plus = inv_s * (c + delta)
    minus = inv_s * (c - delta)
    inf = math.inf
    lo_edge = xa < -1.0 + 0.5 * delta
    hi_edge = xa > 1.0 - 0.5 * delta
    a = ops.where(lo_edge, -inf, minus)
    b = ops.where(hi_edge, inf, plus)
    return _restore(log_diff_ndtr(a, b), dtype)
