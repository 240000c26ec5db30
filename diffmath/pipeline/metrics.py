"""The distances between sample sets that ``diffmath evaluate`` reports, as plain numpy math:
the Fréchet distance between Gaussians (Heusel et al. 2017, the FID's formula) and their fitted
statistics, the 1-D and sliced Wasserstein distances (Rabin et al. 2011), and the class
statistics of a classifier's probabilities.
"""

from __future__ import annotations

import math

import numpy as np


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (Wasserstein-2 squared) distance between N(mu1, cov1) and N(mu2, cov2):

    FD = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)

    (Dowson & Landau 1982; the FID of Heusel et al. 2017). The trace of the matrix square root
    is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    cov1^1/2 cov2 cov1^1/2 (``numpy.linalg.eigh``; tiny negative round-off clipped to 0), so
    singular covariances are fine and no complex parts appear. float64.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu2.shape[0] != d or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(
            f"mu1, mu2 must have shape (d,) and cov1, cov2 shape (d, d); got {mu1.shape}, {mu2.shape}, "
            f"{c1.shape}, {c2.shape}"
        )
    for n, c in (("cov1", c1), ("cov2", c2)):
        if not np.all(np.isfinite(c)):
            raise ValueError(f"{n} must be finite")
        if not np.allclose(c, c.T, rtol=1e-8, atol=1e-12 * max(1.0, np.abs(c).max())):
            raise ValueError(f"{n} must be symmetric")
    c1, c2 = 0.5 * (c1 + c1.T), 0.5 * (c2 + c2.T)
    w, V = np.linalg.eigh(c1)
    if w.min() < -1e-8 * max(1.0, w.max()):
        raise ValueError(f"cov1 must be positive semi-definite; its smallest eigenvalue is {w.min()}")
    s1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    m = s1 @ c2 @ s1
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = float(np.sum(np.sqrt(np.clip(ev, 0, None))))
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, d) features, float64, covariance with N - 1 (``np.cov``)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N, d) with N >= 2; got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_features(f1, f2) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def wasserstein_1d(u, v, p: int = 1) -> float:
    """W_p between the empirical distributions of 1-D samples u and v (any sizes):

    W_p^p = int_0^1 |F_u^-1(q) - F_v^-1(q)|^p dq,

    exact for empirical measures: both quantile functions are step functions, constant between
    the merged levels {i/n} U {j/m}. Returns W_p (not its p-th power)."""
    u = np.sort(np.asarray(u, np.float64).ravel())
    v = np.sort(np.asarray(v, np.float64).ravel())
    n, m = u.size, v.size
    if n == 0 or m == 0:
        raise ValueError(f"u and v must be non-empty; got sizes {n} and {m}")
    if p < 1:
        raise ValueError(f"p must be >= 1; got {p}")
    qs = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    qs[-1] = 1.0
    q_prev = np.concatenate([[0.0], qs[:-1]])
    mid = 0.5 * (q_prev + qs)
    iu = np.minimum((mid * n).astype(np.int64), n - 1)
    iv = np.minimum((mid * m).astype(np.int64), m - 1)
    w = qs - q_prev
    return float(np.sum(w * np.abs(u[iu] - v[iv]) ** p) ** (1.0 / p))


def sliced_wasserstein(x, y, num_projections: int = 256, p: int = 1, seed: int = 0) -> float:
    """Sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015):

    SW_p(x, y) = ( E_theta W_p^p(<theta, x>, <theta, y>) )^(1/p),  theta ~ Uniform(S^{d-1}),

    estimated with ``num_projections`` directions from a seeded generator (in 1-D the only
    directions are +-1 and SW_p = W_p exactly). x: (n, d), y: (m, d)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have shapes (n, d) and (m, d); got {x.shape} and {y.shape}")
    d = x.shape[1]
    if d == 1:
        return wasserstein_1d(x[:, 0], y[:, 0], p)
    theta = np.random.default_rng(seed).standard_normal((num_projections, d))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    px, py = x @ theta.T, y @ theta.T
    vals = [wasserstein_1d(px[:, k], py[:, k], p) ** p for k in range(num_projections)]
    return float(np.mean(vals) ** (1.0 / p))


def class_metrics(proba: np.ndarray, num_classes: int = 10) -> dict:
    """Mean confidence, argmax class histogram, its entropy (bits) and the classes present."""
    pred = proba.argmax(axis=1)
    hist = np.bincount(pred, minlength=num_classes)
    frac = hist / max(1, hist.sum())
    nz = frac[frac > 0]
    return {
        "mean_confidence": float(proba.max(axis=1).mean()),
        "class_histogram": [int(h) for h in hist],
        "class_entropy_bits": float(-(nz * np.log2(nz)).sum()),
        "max_entropy_bits": float(math.log2(num_classes)),
        "classes_present": int((hist > 0).sum()),
    }
