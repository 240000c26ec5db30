"""Evaluating generated samples (``diffmath evaluate``).

Digits (a trained run on ``--data digits``):

- a small classifier of the real digits: scikit-learn's ``MLPClassifier`` (64-256-64-10,
  ReLU), trained once on the 1,497 training digits at 8x8 and cached as plain arrays (an
  ``.npz`` read with ``allow_pickle=False``; never a pickle) in ``$DIFFMATH_CACHE``, else
  ``$XDG_CACHE_HOME/diffmath``, else ``~/.cache/diffmath`` (falls back to training in memory
  when no cache folder is writable). 16x16 images are average-pooled to 8x8 first.
- mean classifier confidence (the mean of the max softmax probability), the class histogram
  and its entropy in bits (log2 10 = 3.32 for uniform), and the number of classes present
  (argmax counts).
- the Fréchet distance (FD) between Gaussians fitted to the classifier's last hidden layer
  (64 features) of the real training digits and of the samples, beside the same figure for
  the real held-out digits (the floor) and for N(0, I) noise clipped to [-1, 1] (the
  ceiling), each from the same number of images (the held-out count, 300) so the finite-sample
  bias is comparable.
- the test VLB in bits/dim on held-out images: sum over all t of ``losses.vb_terms_bpd``
  (the decoder term at t = 0 on the data's grid, 17 levels for 8x8 digits) + ``prior_bpd``,
  with the model's learned variance, or for a fixed-variance model both sigma^2 = beta_tilde
  ("small") and sigma^2 = beta ("large"); each is an upper bound on the NLL, and the smaller
  is reported as ``test_vlb_bpd``.

Toy data: the sliced Wasserstein-1 distance between samples and the held-out set, with the
same floor (training set vs held-out) and ceiling (N(0, I)). Image folders: the test VLB.

Class-conditional samples (samples.npz holds the requested ``labels``; ``per_class_metrics``),
for each class c asked, on the digits:

- agreement: the fraction of the samples asked as c that the classifier assigns to c (its
  argmax), and their mean probability of c;
- the per-class Fréchet distance: the class's training digits (about 150) as the reference,
  the samples asked as c cut into disjoint sets of n_c = min(#samples, #held-out of c) = 30
  images, and the mean FD over those sets; the floor is the class's 30 held-out digits against
  the same reference, so the two share the finite-sample bias of n_c images in 64 dimensions
  (large at n = 30: the floor is ~10x the pooled floor of n = 300);
- the feature spread tr Cov(samples) / tr Cov(training digits of c), a diversity measure that
  guidance lowers (1: as diverse as the real class);
- the mean of each over the classes asked, and the lowest agreement.

On the gmm toy data the classifier is the nearest component mean (the Bayes classifier of
an equal-weight isotropic mixture with equal variances) and the distance per class is the
sliced Wasserstein-1 against the component's held-out points, with the floor training vs
held-out points of the component. Other data (folders, latents of other images) get the
count of samples per requested class only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write_json, atomic_write_npz, atomic_write_text

__all__ = [
    "frechet_distance",
    "gaussian_stats",
    "frechet_distance_features",
    "wasserstein_1d",
    "sliced_wasserstein",
    "DigitClassifier",
    "digit_classifier",
    "class_metrics",
    "per_class_metrics",
    "guidance_sweep",
    "evaluate_guidance",
    "guidance_table",
    "class_table",
    "vlb_bpd",
    "evaluate_run",
    "cache_dir",
]


# ----------------------------------------------------------------------------- distances
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
            f"mu1, mu2 must have shape (d,) and cov1, cov2 shape (d, d); got {mu1.shape}, {mu2.shape}, {c1.shape}, {c2.shape}"
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


# ----------------------------------------------------------------------------- the digit classifier
_CLF_VERSION = "digits-mlp-v1"
_CLF_HIDDEN = (256, 64)


def cache_dir() -> Path:
    """$DIFFMATH_CACHE, else $XDG_CACHE_HOME/diffmath, else ~/.cache/diffmath."""
    if os.environ.get("DIFFMATH_CACHE"):
        return Path(os.environ["DIFFMATH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffmath"


class DigitClassifier:
    """An MLP (ReLU hidden layers, softmax output) held as plain float64 arrays.

    ``features(x)`` is the last hidden layer; ``proba(x)`` the class probabilities; x: images
    (N, 1, 8, 8) or (N, 1, 16, 16) in [-1, 1] (16x16 is 2x2 average-pooled) or (N, 64)."""

    def __init__(self, weights: list, biases: list, info: dict):
        self.weights = [np.asarray(w, np.float64) for w in weights]
        self.biases = [np.asarray(b, np.float64) for b in biases]
        self.info = info

    @staticmethod
    def prepare(x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim == 4:
            if x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] not in (8, 16):
                raise ValueError(f"digit images must have shape (N, 1, 8, 8) or (N, 1, 16, 16); got {x.shape}")
            if x.shape[2] == 16:
                x = x.reshape(x.shape[0], 1, 8, 2, 8, 2).mean(axis=(3, 5))
            x = x.reshape(x.shape[0], 64)
        if x.ndim != 2 or x.shape[1] != 64:
            raise ValueError(f"expected (N, 64) digit vectors; got {x.shape}")
        return np.clip(x, -1.0, 1.0)

    def _hidden(self, x):
        h = self.prepare(x)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def features(self, x) -> np.ndarray:
        return self._hidden(x)

    def proba(self, x) -> np.ndarray:
        z = self._hidden(x) @ self.weights[-1] + self.biases[-1]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _train_classifier() -> DigitClassifier:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from .data import load_digits

    d = load_digits(8)
    xtr = DigitClassifier.prepare(d.train)
    xte = DigitClassifier.prepare(d.held_out)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    clf = MLPClassifier(hidden_layer_sizes=_CLF_HIDDEN, alpha=1e-3, max_iter=400, random_state=0)
    # one BLAS thread: these matrices are small, and spinning BLAS threads on busy cores make
    # the fit ~5x slower
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, d.labels_train)
    model = DigitClassifier(clf.coefs_, clf.intercepts_, {})
    p = model.proba(xte)
    model.info = {
        "kind": f"sklearn MLPClassifier {64}-{'-'.join(map(str, _CLF_HIDDEN))}-10 (ReLU), alpha=1e-3, random_state=0",
        "version": _CLF_VERSION,
        "held_out_accuracy": float((p.argmax(1) == d.labels_held_out).mean()),
        "held_out_mean_confidence": float(p.max(1).mean()),
        "trained_on": f"{len(xtr)} training digits (8x8)",
    }
    return model


def digit_classifier(cache: bool = True) -> DigitClassifier:
    """The cached digit classifier (trained on first use, a few seconds on a CPU)."""
    import sklearn

    key = hashlib.sha256(f"{_CLF_VERSION}|{sklearn.__version__}|{np.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / f"{_CLF_VERSION}-{key}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                n = int(z["num_layers"])
                info = json.loads(str(z["info"]))
                return DigitClassifier([z[f"w{i}"] for i in range(n)], [z[f"b{i}"] for i in range(n)], info)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file: retrain and replace it
    model = _train_classifier()
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"w{i}": w for i, w in enumerate(model.weights)} | {f"b{i}": b for i, b in enumerate(model.biases)}
            atomic_write_npz(path, num_layers=np.int64(len(model.weights)), info=np.str_(json.dumps(model.info)), **arrays)
        except OSError:
            pass  # no writable cache: the classifier lives in memory for this call
    return model


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


def _requested_order(labels) -> list[int]:
    return list(dict.fromkeys(int(c) for c in np.asarray(labels)))


def per_class_metrics(x: np.ndarray, labels, data, *, clf=None, seed: int = 0) -> dict:
    """Per-class metrics of class-conditional samples ``x`` (N, ...) asked for ``labels`` (N,)
    on ``data`` (a ``diffmath.data.Data`` with labels): see the module docstring. Returns
    {"classes": {name: {...}}, "mean": {...}, "min_agreement": ...}; on data that are neither
    the digits nor the gmm, the sample count per class only."""
    labels = np.asarray(labels, np.int64)
    names = [str(c) for c in (data.class_names or ())]
    order = _requested_order(labels)
    out: dict = {"classes": {}}
    digits = data.name in ("digits", "digits-latent") and tuple(x.shape[1:]) in ((1, 8, 8), (1, 16, 16))
    toy = data.name == "gmm" and x.ndim == 2
    if digits:
        clf = clf or digit_classifier()
        held_lab, tr_lab = np.asarray(data.labels_held_out), np.asarray(data.labels_train)
        xc_all = np.clip(x, -1.0, 1.0)
        feat = clf.features(xc_all)
        proba = clf.proba(xc_all)
        f_train, f_held = clf.features(data.train), clf.features(data.held_out)
    elif toy:
        from .data import gmm_means

        held_lab, tr_lab = np.asarray(data.labels_held_out), np.asarray(data.labels_train)
        pred_all = np.argmin(((x[:, None, :] - gmm_means(len(names))[None]) ** 2).sum(-1), axis=1)
    for c in order:
        m = labels == c
        name = names[c] if c < len(names) else str(c)
        row: dict = {"label": int(c), "samples": int(m.sum())}
        if digits:
            pc = proba[m]
            ref = f_train[tr_lab == c]
            held = f_held[held_lab == c]
            n = min(int(m.sum()), len(held))
            fs = feat[m]
            sets = [fs[i * n : (i + 1) * n] for i in range(len(fs) // n)] if n >= 2 else []
            row.update(
                agreement=float((pc.argmax(1) == c).mean()),
                mean_prob=float(pc[:, c].mean()),
                predicted_histogram=[int(h) for h in np.bincount(pc.argmax(1), minlength=proba.shape[1])],
                fd=float(np.mean([frechet_distance_features(ref, f) for f in sets])) if sets else None,
                fd_floor=frechet_distance_features(ref, held[:n]) if n >= 2 else None,
                fd_n=int(n), fd_sets=len(sets),
                spread=float(np.trace(np.atleast_2d(np.cov(fs, rowvar=False))) /
                             np.trace(np.atleast_2d(np.cov(ref, rowvar=False)))) if len(fs) >= 2 else None,
            )
        elif toy:
            held_c, tr_c = data.held_out[held_lab == c], data.train[tr_lab == c]
            n = min(int(m.sum()), len(held_c))
            row.update(
                agreement=float((pred_all[m] == c).mean()),
                sliced_wasserstein=sliced_wasserstein(x[m][:n], held_c[:n], seed=seed),
                sliced_wasserstein_floor=sliced_wasserstein(tr_c[:n], held_c[:n], seed=seed),
                sw_n=int(n),
            )
        out["classes"][name] = row
    rows = list(out["classes"].values())
    keys = [k for k in ("agreement", "mean_prob", "fd", "fd_floor", "spread", "sliced_wasserstein",
                        "sliced_wasserstein_floor") if rows and all(r.get(k) is not None for r in rows)]
    out["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if "agreement" in keys:
        worst = min(rows, key=lambda r: r["agreement"])
        out["min_agreement"] = {"class": names[worst["label"]] if worst["label"] < len(names) else str(worst["label"]),
                                "agreement": worst["agreement"]}
    if digits:
        out["classifier"] = "argmax of the digit classifier; FD in its last hidden layer, per class (module docstring)"
    elif toy:
        out["classifier"] = "nearest component mean (the mixture's Bayes classifier); sliced Wasserstein-1 per class"
    return out


def guidance_sweep(loaded, data, scales, *, per_class: int = 100, classes=None, sampler: str = "ddim", steps=50,
                   seed: int = 0, batch_size: int = 500, progress: bool = False, keep: float | None = None,
                   rescale: float = 0.0, decode=None):
    """Sample ``per_class`` samples of each class (default all of the run's) at every guidance
    scale s in ``scales`` (``diffmath.sample.generate``: the same start and noise at every s)
    and score them with ``per_class_metrics``. ``per_class`` may be a dict {s: count}. Returns
    (rows, kept) with one row per s: {"guidance": s, "mean": ..., "classes": ...}, and kept the
    (samples, labels) drawn at s = ``keep`` (None if not asked). ``decode``: turns the samples
    into the data's images first (a latent run's VAE decoder)."""
    from .generate import class_labels, generate

    K = loaded.num_classes
    classes = list(range(K)) if classes is None else [int(c) for c in classes]
    rows, kept = [], None
    for s in scales:
        n = per_class[s] if isinstance(per_class, dict) else per_class
        y = class_labels(classes, n * len(classes))
        x = generate(loaded, len(y), sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, progress=progress,
                     labels=y, guidance=float(s), guidance_rescale=rescale, clip_x0=None if decode else "auto")
        if decode is not None:
            x = decode(x)
        m = per_class_metrics(x, y, data, seed=seed)
        rows.append({"guidance": float(s), "per_class": int(n), **m})
        if keep is not None and float(s) == float(keep):
            kept = (x, y)
    return rows, kept


def evaluate_guidance(run, out=None, *, scales=(0.0, 1.0, 2.0, 3.0, 5.0), per_class: int = 100, sampler: str = "ddim",
                      steps=50, seed: int = 0, device: str = "auto", progress: bool = False,
                      trust_unverified: bool = False, loaded=None, decode=None, adopt=None) -> dict:
    """``diffmath evaluate --guidance-sweep``: the guidance sweep of a class-conditional run
    (``guidance_sweep``: ``per_class`` samples of every class at each scale s, scored per
    class); writes ``out``/guidance.json and guidance.png (default ``out`` = the run) and returns
    {"scales": rows, ...}. ``loaded``, ``decode``, ``adopt``: the model, the decoder of its
    samples and the legacy-files rule of the run folder, for a run that is not a pixel run
    (``latent.evaluate_guidance_latent``); by default ``run``'s own model.
    ``ValueError`` before any work for an unconditional run or a scale that is negative or
    not finite."""
    from .checkpoint import legacy_run_files
    from .data import load_data
    from .plots import plot_guidance
    from .rundir import claim_output
    from .generate import check_sampling, load_model, unconditional_error

    run = Path(run)
    scales = [float(v) for v in scales]
    bad = [v for v in scales if not (math.isfinite(v) and v >= 0)]
    if bad or not scales:
        raise ValueError(f"guidance scales must be finite and >= 0; got {bad or scales}")
    lm = loaded if loaded is not None else load_model(run=run, device=device, trust_unverified=trust_unverified)
    if lm.num_classes == 0:
        raise unconditional_error(lm, "--guidance-sweep")
    check_sampling(lm, per_class * lm.num_classes, sampler, steps, 0.0, seed)
    data = load_data(lm.config.data, lm.config.image_size)
    out = Path(out) if out is not None else run
    with claim_output(out, "evaluate", ("guidance.json", "guidance.png"), adopt=adopt or legacy_run_files):
        rows, _ = guidance_sweep(lm, data, scales, per_class=per_class, sampler=sampler, steps=steps, seed=seed,
                                 progress=progress, decode=decode)
        res = {"run": str(run), "sampler": sampler, "steps": steps, "seed": seed, "checkpoint": str(lm.checkpoint),
               "scales": rows}
        atomic_write_json(out / "guidance.json", res)
        plot_guidance(out / "guidance.png", rows, title=f"{data.name}: classifier-free guidance ({sampler})")
    return res


# ----------------------------------------------------------------------------- test VLB
@torch.no_grad()
def vlb_bpd(loaded, x0: np.ndarray, bins: int, *, seed: int = 0, batch_size: int = 512, progress: bool = False) -> dict:
    """The variational bound -log p(x0) <= L_T + sum_{t>=1} L_{t-1} + L_0 in bits/dim
    (DDPM eq. 5), estimated with one x_t ~ q(x_t | x0) per (image, t):

    L_T = ``losses.prior_bpd``; L_{t-1} = ``losses.vb_terms_bpd`` (KL of Gaussians); L_0 the
    discretized decoder on ``bins`` levels. The model mean uses the predicted x0 clipped to
    [-1, 1] (guided-diffusion's ``calc_bpd_loop``). Returns per-variance totals (mean over
    images) and the per-term curve (mean over images, bits/dim, per t).

    ``loaded``: a ``diffmath.sample.LoadedModel``.
    """
    from .. import forward, losses, posterior
    from ..losses import vb_terms_bpd
    from .loop import x0_from_prediction

    s = loaded.schedule
    T = s.num_timesteps
    dev = loaded.device
    x = torch.as_tensor(np.asarray(x0, np.float32), device=dev)
    n = x.shape[0]
    C = x.shape[1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    prior = losses.prior_bpd(s, x.double()).float().cpu().numpy()
    variants = ["learned"] if loaded.config.learn_sigma else ["small", "large"]
    terms = {v: np.zeros((T, n)) for v in variants}
    per = max(1, batch_size // n)
    from tqdm.auto import tqdm

    for t0 in tqdm(range(0, T, per), disable=not progress, desc="test VLB", leave=False):
        ts = list(range(t0, min(T, t0 + per)))
        xb = x.repeat(len(ts), *([1] * (x.ndim - 1)))
        tb = torch.tensor(np.repeat(ts, n), device=dev)
        noise = torch.randn(xb.shape, generator=g).to(dev)
        x_t = forward.q_sample(s, xb, tb, noise)
        out = loaded.forward(x_t, tb)
        pred, v = out[:, :C], (out[:, C:] if loaded.config.learn_sigma else None)
        x0_pred = x0_from_prediction(loaded.config.prediction, s, x_t, tb, pred).clamp(-1, 1)
        mean = posterior.q_posterior_mean(s, x0_pred, x_t, tb)
        for var in variants:
            if var == "learned":
                lv = losses.learned_range_log_variance(s, tb, v)
            else:  # the fixed "small" / "large" variances, float64 from the schedule's tables
                lv = losses.fixed_log_variance(s, tb, var).reshape(-1, *([1] * (x_t.ndim - 1))).expand(x_t.shape)
            vb = vb_terms_bpd(s, mean.double(), lv.double(), xb.double(), x_t.double(), tb, bins=bins)
            terms[var][ts[0] : ts[-1] + 1] = vb.reshape(len(ts), n).cpu().numpy()
    res = {"images": int(n), "bins": int(bins), "timesteps": int(T), "prior_bpd": float(prior.mean())}
    for var in variants:
        total = terms[var].sum(axis=0) + prior
        res[var] = {
            "vlb_bpd": float(total.mean()),
            "vlb_bpd_stderr": float(total.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "decoder_bpd": float(terms[var][0].mean()),
        }
    best = min(variants, key=lambda v: res[v]["vlb_bpd"])
    res["test_vlb_bpd"] = res[best]["vlb_bpd"]
    res["variance"] = best
    res["curve"] = {v: terms[v].mean(axis=1).tolist() for v in variants}
    return res


# ----------------------------------------------------------------------------- the command
def _load_samples(path: Path) -> tuple[np.ndarray, dict]:
    if not path.exists():
        raise FileNotFoundError(f"no samples at {str(path)!r}; run `diffmath sample --run RUN --out RUN` first or pass --samples")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "samples" not in z:
                raise ValueError(f"{str(path)!r} holds no 'samples' array (keys: {sorted(z.files)})")
            x = z["samples"].astype(np.float32)
            info = json.loads(str(z["info"])) if "info" in z.files else {}
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated .npz is a bad zip
        if isinstance(e, ValueError) and "samples" in str(e):
            raise
        raise ValueError(f"{str(path)!r} is not a readable samples .npz (no pickles are loaded): {e}") from e
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{str(path)!r} holds non-finite sample values")
    if labels is not None:
        if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{str(path)!r}: 'labels' must hold one integer class per sample, shape ({len(x)},); got "
                             f"{labels.dtype} of shape {labels.shape}")
        info = {**info, "_labels": labels.astype(np.int64)}
    return x, info


def evaluate_run(run, samples=None, out=None, *, vlb_images: int = 64, device: str = "auto", seed: int = 0,
                 progress: bool = True, trust_unverified: bool = False) -> dict:
    """Evaluate the samples of a run (default ``RUN/samples.npz``); writes ``metrics.json`` to
    ``out`` (default the run directory) and returns the metrics. The inputs are checked first;
    then ``out`` is locked until the metrics are written (``rundir.claim_output``: a metrics.json
    there that diffmath did not write is never replaced). ``trust_unverified``: load the
    checkpoint for the test VLB even if its weights cannot be verified (``sample.load_model``)."""
    from .checkpoint import legacy_run_files, read_run_config
    from .data import load_data
    from .rundir import claim_output

    run = Path(run)
    rc = read_run_config(run)
    cfg = rc["config"]
    samples_path = Path(samples) if samples is not None else run / "samples.npz"
    x, sinfo = _load_samples(samples_path)
    labels = sinfo.pop("_labels", None)
    if labels is not None:
        K = int(cfg.get("num_classes", 0) or 0)
        if K == 0:
            raise ValueError(f"{str(samples_path)!r} holds class labels but the run {str(run)!r} is unconditional "
                             "(num_classes = 0): evaluate class-conditional samples against their own run")
        if labels.size and (labels.min() < 0 or labels.max() >= K):
            bad = int(labels.min() if labels.min() < 0 else labels.max())
            raise ValueError(f"{str(samples_path)!r}: label {bad} is outside [0, {K}) (the run's {K} classes)")
    data = load_data(cfg["data"], cfg["image_size"])
    if tuple(x.shape[1:]) != data.shape:
        raise ValueError(f"the samples have shape {tuple(x.shape[1:])} per item but the run's data have {data.shape}")
    if labels is not None:
        sinfo = {**sinfo, "_labels": labels}
    out = Path(out) if out is not None else run
    with claim_output(out, "evaluate", ("metrics.json",), adopt=legacy_run_files):
        return _evaluate(run, x, sinfo, samples_path, data, out, vlb_images, device, seed, progress, trust_unverified)


def _evaluate(run, x, sinfo, samples_path, data, out, vlb_images, device, seed, progress, trust_unverified) -> dict:
    from .checkpoint import RunError
    from .generate import load_model

    metrics: dict = {
        "run": str(run),
        "data": data.name,
        "samples_file": str(samples_path),
        "num_samples": int(x.shape[0]),
        "sampler": sinfo,
    }
    labels = sinfo.pop("_labels", None)
    rng = np.random.default_rng(seed)
    if data.kind == "toy":
        ref = data.train
        n = min(len(x), len(data.held_out))
        metrics["sliced_wasserstein"] = {
            "samples": sliced_wasserstein(x[:n], data.held_out[:n], seed=seed),
            "train_vs_held_out (floor)": sliced_wasserstein(ref[:n], data.held_out[:n], seed=seed),
            "gaussian_noise (ceiling)": sliced_wasserstein(rng.standard_normal((n, x.shape[1])), data.held_out[:n], seed=seed),
            "n": int(n),
            "p": 1,
            "projections": 256,
        }
        metrics["test_vlb"] = "not reported: toy data are continuous (the VLB in bits/dim needs discrete data)"
        if labels is not None:
            metrics["per_class"] = per_class_metrics(x, labels, data, seed=seed)
    else:
        xc = np.clip(x, -1.0, 1.0)
        if data.name == "digits":
            clf = digit_classifier()
            p = clf.proba(xc)
            metrics.update(class_metrics(p))
            real_p = clf.proba(data.held_out)
            ref_f = clf.features(data.train)
            n = min(len(xc), len(data.held_out))
            noise = np.clip(rng.standard_normal((n,) + data.shape), -1, 1)
            metrics["frechet_distance"] = {
                "samples": frechet_distance_features(ref_f, clf.features(xc[:n])),
                "held_out_real (floor)": frechet_distance_features(ref_f, clf.features(data.held_out[:n])),
                "gaussian_noise (ceiling)": frechet_distance_features(ref_f, clf.features(noise)),
                "n": int(n),
                "reference": f"{len(data.train)} real training digits",
                "features": f"the classifier's last hidden layer ({_CLF_HIDDEN[-1]} units)",
            }
            metrics["classifier"] = dict(clf.info)
            metrics["real_held_out"] = {k: v for k, v in class_metrics(real_p).items() if k != "max_entropy_bits"}
        if labels is not None:
            metrics["per_class"] = per_class_metrics(x, labels, data, seed=seed)
        if vlb_images > 0 and len(data.held_out) == 0:
            metrics["test_vlb"] = "not reported: no held-out images (the data set is too small to hold any out)"
        elif vlb_images > 0:
            loaded = load_model(run=run, device=device, trust_unverified=trust_unverified)
            if list(loaded.data_shape) != list(data.shape):
                raise RunError(f"the checkpoint's data shape {loaded.data_shape} does not match the data {data.shape}")
            held = data.held_out
            idx = np.random.default_rng(seed).permutation(len(held))[: min(vlb_images, len(held))]
            v = vlb_bpd(loaded, held[np.sort(idx)], data.bins or 256, seed=seed, progress=progress)
            v.pop("curve", None)
            metrics["test_vlb"] = v
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------- reporting
def metric_rows(m: dict) -> list[tuple[str, str, str]]:
    """The headline metrics of an ``evaluate_run`` result as (metric, samples, reference) rows of
    formatted text: the one formatting of the metrics, shared by the terminal (``format_metrics``)
    and the reports (``metrics_table``: ``write_report`` and the latent demo's report.md)."""
    rows = []
    if "mean_confidence" in m:
        rh = m["real_held_out"]
        rows += [
            ("mean classifier confidence", f"{m['mean_confidence']:.3f}", f"real held-out: {rh['mean_confidence']:.3f}"),
            ("digit classes present", f"{m['classes_present']} / 10", f"real held-out: {rh['classes_present']} / 10"),
            ("class entropy (bits)", f"{m['class_entropy_bits']:.3f}", f"uniform: {m['max_entropy_bits']:.3f}"),
        ]
    if "frechet_distance" in m:
        fd = m["frechet_distance"]
        rows.append((
            f"Fréchet distance (classifier features, n = {fd['n']})", f"{fd['samples']:.3f}",
            f"floor (real held-out): {fd['held_out_real (floor)']:.3f}; "
            f"ceiling (Gaussian noise): {fd['gaussian_noise (ceiling)']:.3f}",
        ))
    if "sliced_wasserstein" in m:
        sw = m["sliced_wasserstein"]
        rows.append((
            f"sliced Wasserstein-1 (n = {sw['n']})", f"{sw['samples']:.4f}",
            f"floor: {sw['train_vs_held_out (floor)']:.4f}; ceiling: {sw['gaussian_noise (ceiling)']:.4f}",
        ))
    pc = m.get("per_class")
    if isinstance(pc, dict) and pc.get("mean"):
        mean, k = pc["mean"], len(pc["classes"])
        if "agreement" in mean:
            worst = pc["min_agreement"]
            rows.append((f"agreement with the requested class (mean over {k} classes)", f"{mean['agreement']:.3f}",
                         f"lowest: {worst['agreement']:.3f} (class {worst['class']})"))
        if "fd" in mean:
            rows.append((f"per-class Fréchet distance (mean over {k} classes)", f"{mean['fd']:.3f}",
                         f"per-class floor (real held-out, n = {min(r['fd_n'] for r in pc['classes'].values())}): "
                         f"{mean['fd_floor']:.3f}; feature spread "
                         f"{mean['spread']:.3f} of the real class's"))
        if "sliced_wasserstein" in mean:
            rows.append((f"per-class sliced Wasserstein-1 (mean over {k} classes)", f"{mean['sliced_wasserstein']:.4f}",
                         f"floor: {mean['sliced_wasserstein_floor']:.4f}"))
    v = m.get("test_vlb")
    if isinstance(v, dict):
        rows.append((
            f"test VLB (bits/dim, {v['images']} held-out images, {v['bins']} levels)",
            f"{v['test_vlb_bpd']:.3f} (sigma^2 {v['variance']})",
            f"decoder term {v[v['variance']]['decoder_bpd']:.3f}, prior {v['prior_bpd']:.1e}",
        ))
    return rows


def metrics_table(m: dict) -> list[str]:
    """``metric_rows`` as the lines of a markdown table (for report.md)."""
    return ["| metric | samples | reference |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in metric_rows(m)]


def format_metrics(m: dict) -> str:
    """A few human-readable lines of the headline metrics (the rows of report.md's table)."""
    lines = [f"{m.get('num_samples')} samples of {m.get('data')}"]
    lines += [f"{a}: {b} — {c}" for a, b, c in metric_rows(m)]
    return "\n".join(lines)


def guidance_table(rows: list) -> list[str]:
    """The guidance sweep (``guidance_sweep`` rows) as markdown lines: per scale s, the mean and
    lowest agreement, the mean per-class FD beside its floor, and the feature spread."""
    L = ["| guidance s | samples per class | agreement (mean) | agreement (lowest class) | per-class FD (mean) | "
         "per-class floor (mean) | feature spread |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mean"]
        w = r.get("min_agreement", {})
        L.append(f"| {r['guidance']:g} | {r['per_class']} | {m.get('agreement', float('nan')):.3f} | "
                 f"{w.get('agreement', float('nan')):.2f} (class {w.get('class')}) | {m.get('fd', float('nan')):.2f} | "
                 f"{m.get('fd_floor', float('nan')):.2f} | {m.get('spread', float('nan')):.3f} |")
    return L


def class_table(row: dict, uncond_fd: float | None = None) -> list[str]:
    """One guidance scale's per-class metrics as markdown lines, with the bound
    1.5 x floor + the unconditional FD when ``uncond_fd`` is given."""
    bound = uncond_fd is not None
    head = "| class | agreement | mean p(class) | FD | floor | spread |" + (" 1.5 x floor + FD_uncond | within |" if bound
                                                                            else "")
    L = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in row["classes"].items():
        line = (f"| {name} | {c['agreement']:.2f} | {c['mean_prob']:.3f} | {c['fd']:.2f} | {c['fd_floor']:.2f} | "
                f"{c['spread']:.3f} |")
        if bound:
            b = 1.5 * c["fd_floor"] + uncond_fd
            line += f" {b:.2f} | {'yes' if c['fd'] <= b else 'no'} |"
        L.append(line)
    return L


def guidance_report_lines(metrics: dict) -> list[str]:
    """report.md's section on a class-conditional demo: the 10-row grid, the guidance table
    and plot, and the per-class table at the default scale and at s = 1."""
    g = metrics["guidance"]
    fd_u = metrics.get("frechet_distance", {}).get("samples")
    L = ["## Asking for a class: classifier-free guidance", ""]
    L.append(f"One network is both models: trained with label dropout, it samples the unconditional model (the null "
             f"label, above) and each digit on request. eps = eps_u + s (eps_c - eps_u); the default s = {g['default']:g}. "
             f"Rows: digits 0-9 asked at s = {g['default']:g}, the first 10 samples of each.")
    L.append("")
    L.append("![one row per digit](classes.png)")
    L.append("")
    L.append("Agreement: the fraction of the samples asked as a digit that the classifier reads as that digit. "
             "Per-class FD: the samples of a digit against its training digits in sets of n = 30 images (the mean over "
             "the sets), beside the floor (the digit's 30 held-out images against the same reference). Spread: "
             "tr Cov of the features of the samples / of the real digit (diversity).")
    L.append("")
    L += guidance_table(g["scales"])
    L.append("")
    L.append("![agreement, FD and spread against s](guidance.png)")
    for s in dict.fromkeys([g["default"], 1.0]):
        row = next((r for r in g["scales"] if r["guidance"] == s), None)
        if row is None:
            continue
        L.append("")
        L.append(f"Per digit at s = {s:g} ({row['per_class']} samples each)"
                 + (f"; the unconditional FD is {fd_u:.3f}" if fd_u is not None else "") + ":")
        L.append("")
        L += class_table(row, fd_u)
    return L


def write_report(run, metrics: dict, config, sample_info: dict, timings: dict, trained_steps: int | None = None) -> Path:
    """report.md in the run directory, linking samples.png, loss.png, schedule.png, metrics.json."""
    import platform

    from .checkpoint import read_run_config

    run = Path(run)
    rc = read_run_config(run)
    params = rc.get("model", {}).get("parameters")
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    L = ["# diffmath demo report", ""]
    L.append(
        f"Data: **{metrics['data']}** ({rc['data']['train']} training / {rc['data']['held_out']} held-out, shape "
        f"{tuple(rc['data']['shape'])}). Model: {rc['model']['class']} with {params:,} parameters, "
        f"{cfg['prediction']}-prediction, {cfg['schedule']} schedule, T = {cfg['timesteps']}, "
        f"{cfg['steps']} steps of batch {cfg['batch_size']}."
    )
    L.append("")
    steps = "adaptive" if sample_info.get("steps") is None else sample_info["steps"]
    L.append(
        f"Sampler: {sample_info['sampler']} with {steps} steps"
        + (f", eta = {sample_info['eta']}" if sample_info.get("eta") is not None else "")
        + f", {sample_info['num_samples']} samples, EMA weights of step {sample_info['step']}."
    )
    L.append("")
    L.append("## Metrics")
    L.append("")
    L += metrics_table(metrics)
    if "class_histogram" in metrics:
        L.append("")
        L.append("Class histogram of the samples (classifier argmax, digits 0-9): " + ", ".join(map(str, metrics["class_histogram"])))
        ci = metrics.get("classifier", {})
        L.append("")
        L.append(
            f"Classifier: {ci.get('kind')}; held-out accuracy {ci.get('held_out_accuracy', float('nan')):.3f}. "
            "The Fréchet distance compares Gaussians fitted to its last hidden layer on the real training digits "
            "and on each set."
        )
    if isinstance(metrics.get("guidance"), dict):
        L.append("")
        L += guidance_report_lines(metrics)
    L.append("")
    L.append("## Figures")
    L.append("")
    L.append("Samples" + (" of the unconditional model (null label)" if "guidance" in metrics else "")
             + ": ![samples](samples.png)")
    L.append("")
    L.append("Training loss: ![loss](loss.png)")
    L.append("")
    L.append("Noise schedule: ![schedule](schedule.png)")
    L.append("")
    L.append("All numbers: [metrics.json](metrics.json); configuration: [config.json](config.json).")
    L.append("")
    L.append("## Timings")
    L.append("")
    note = "" if trained_steps is None else f" ({trained_steps} steps trained in this call)"
    guid = f", guidance table {timings['guidance_s']} s" if "guidance_s" in timings else ""
    load = timings.get("load_avg_1min")
    load = f" (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)" if load else ""
    L.append(
        f"train {timings.get('train_s')} s{note}, sample {timings.get('sample_s')} s, evaluate {timings.get('evaluate_s')} s"
        f"{guid}, total {timings.get('total_s')} s{load}"
        + (f", {timings['cpu_s']} s of CPU time" if "cpu_s" in timings else "") + f" on {platform.machine()} with {os.cpu_count()} CPU(s) visible; torch "
        f"{torch.__version__}, torch threads: {torch.get_num_threads()}, device: {timings.get('device', cfg.get('device'))}."
    )
    path = run / "report.md"
    atomic_write_text(path, L)
    return path
