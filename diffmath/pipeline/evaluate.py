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

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from .classifier import CLF_HIDDEN, digit_classifier
from .io import atomic_write_json
from .metrics import class_metrics, frechet_distance_features, sliced_wasserstein

__all__ = [
    "per_class_metrics",
    "guidance_sweep",
    "evaluate_guidance",
    "vlb_bpd",
    "evaluate_run",
]


def _requested_order(labels) -> list[int]:
    return list(dict.fromkeys(int(c) for c in np.asarray(labels)))


def per_class_metrics(x: np.ndarray, labels, data, *, clf=None, seed: int = 0) -> dict:
    """Per-class metrics of class-conditional samples ``x`` (N, ...) asked for ``labels`` (N,)
    on ``data`` (a ``diffmath.pipeline.data.Data`` with labels): see the module docstring. Returns
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
                fd_n=int(n),
                fd_sets=len(sets),
                spread=float(
                    np.trace(np.atleast_2d(np.cov(fs, rowvar=False)))
                    / np.trace(np.atleast_2d(np.cov(ref, rowvar=False)))
                )
                if len(fs) >= 2
                else None,
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
    keys = [
        k
        for k in (
            "agreement",
            "mean_prob",
            "fd",
            "fd_floor",
            "spread",
            "sliced_wasserstein",
            "sliced_wasserstein_floor",
        )
        if rows and all(r.get(k) is not None for r in rows)
    ]
    out["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if "agreement" in keys:
        worst = min(rows, key=lambda r: r["agreement"])
        out["min_agreement"] = {
            "class": names[worst["label"]] if worst["label"] < len(names) else str(worst["label"]),
            "agreement": worst["agreement"],
        }
    if digits:
        out["classifier"] = "argmax of the digit classifier; FD in its last hidden layer, per class (module docstring)"
    elif toy:
        out["classifier"] = "nearest component mean (the mixture's Bayes classifier); sliced Wasserstein-1 per class"
    return out


def guidance_sweep(
    loaded,
    data,
    scales,
    *,
    per_class: int = 100,
    classes=None,
    sampler: str = "ddim",
    steps=50,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
    keep: float | None = None,
    rescale: float = 0.0,
    decode=None,
):
    """Sample ``per_class`` samples of each class (default all of the run's) at every guidance
    scale s in ``scales`` (``diffmath.pipeline.generate.generate``: the same start and noise at every s)
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
        x = generate(
            loaded,
            len(y),
            sampler=sampler,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            labels=y,
            guidance=float(s),
            guidance_rescale=rescale,
            clip_x0=None if decode else "auto",
        )
        if decode is not None:
            x = decode(x)
        m = per_class_metrics(x, y, data, seed=seed)
        rows.append({"guidance": float(s), "per_class": int(n), **m})
        if keep is not None and float(s) == float(keep):
            kept = (x, y)
    return rows, kept


def evaluate_guidance(
    run,
    out=None,
    *,
    scales=(0.0, 1.0, 2.0, 3.0, 5.0),
    per_class: int = 100,
    sampler: str = "ddim",
    steps=50,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    trust_unverified: bool = False,
    loaded=None,
    decode=None,
    adopt=None,
) -> dict:
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
    from .generate import check_sampling, unconditional_error
    from .loaded import load_model
    from .plots import plot_guidance
    from .rundir import claim_output

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
        rows, _ = guidance_sweep(
            lm,
            data,
            scales,
            per_class=per_class,
            sampler=sampler,
            steps=steps,
            seed=seed,
            progress=progress,
            decode=decode,
        )
        res = {
            "run": str(run),
            "sampler": sampler,
            "steps": steps,
            "seed": seed,
            "checkpoint": str(lm.checkpoint),
            "scales": rows,
        }
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

    ``loaded``: a ``diffmath.pipeline.loaded.LoadedModel``.
    """
    from .. import forward, losses, posterior
    from ..losses import vb_terms_bpd
    from ..parameterization import x0_from_prediction

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
        raise FileNotFoundError(
            f"no samples at {str(path)!r}; run `diffmath sample --run RUN --out RUN` first or pass --samples"
        )
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
            raise ValueError(
                f"{str(path)!r}: 'labels' must hold one integer class per sample, shape ({len(x)},); got "
                f"{labels.dtype} of shape {labels.shape}"
            )
        info = {**info, "_labels": labels.astype(np.int64)}
    return x, info


def evaluate_run(
    run,
    samples=None,
    out=None,
    *,
    vlb_images: int = 64,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    trust_unverified: bool = False,
) -> dict:
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
            raise ValueError(
                f"{str(samples_path)!r} holds class labels but the run {str(run)!r} is unconditional "
                "(num_classes = 0): evaluate class-conditional samples against their own run"
            )
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
    from .loaded import load_model

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
            "gaussian_noise (ceiling)": sliced_wasserstein(
                rng.standard_normal((n, x.shape[1])), data.held_out[:n], seed=seed
            ),
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
                "features": f"the classifier's last hidden layer ({CLF_HIDDEN[-1]} units)",
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
