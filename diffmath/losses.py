"""Training objectives: DDPM's training loss (Alg. 1) and L_simple, the variational bound in
bits/dim, its weights, and DSM.

References: DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021), min-SNR
weighting (Hang et al. 2023), NCSN denoising score matching (Song & Ermon 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, overload

import numpy as np
import torch

from . import forward, parameterization
from ._array import (
    Array,
    ArrayT,
    TimeLike,
    backend,
    broadcast_coef,
    gather,
    gather_t,
    is_tensor,
    restore,
    schedule_table,
    upcast,
)
from .checks import check_float, check_like, check_positive, check_schedule, check_t, check_variance
from .gaussian import discretized_gaussian_log_likelihood, normal_kl
from .schedules import Schedule

__all__ = [
    "ddpm_training_loss",
    "simple_loss",
    "vb_terms_bpd",
    "prior_bpd",
    "vlb_weight",
    "fixed_log_variance",
    "snr_weight",
    "dsm_loss",
    "learned_range_log_variance",
]

LN2 = math.log(2.0)


def _reduce(per_elem: Any, reduction: str) -> Any:
    ops = backend(per_elem)
    if reduction == "mean":
        return per_elem.mean()
    if reduction == "none":
        return ops.mean_over_non_batch(per_elem)
    if reduction == "sum":
        return per_elem.sum()
    raise ValueError(f"reduction must be 'mean', 'none' or 'sum'; got {reduction!r}")


@overload
def simple_loss(eps: torch.Tensor, eps_pred: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...
@overload
def simple_loss(eps: np.ndarray, eps_pred: np.ndarray, reduction: str = "mean") -> np.ndarray | np.float64: ...
def simple_loss(eps: Array, eps_pred: Array, reduction: str = "mean") -> Array | np.float64:
    """L_simple = E ||eps - eps_theta(x_t, t)||^2   (DDPM eq. 14), the mean squared error.

    eps, eps_pred: arrays of shape (B, ...). ``reduction="mean"`` gives the mean over all
    elements; ``"none"`` one value per sample (mean over the non-batch dims), shape (B,).
    """
    eps_pred = check_float(eps_pred, "eps_pred")
    eps = check_like(eps, eps_pred, "eps", "eps_pred")
    d = upcast(eps_pred) - upcast(eps)
    return _reduce(d * d, reduction)


PREDICTIONS = ("eps", "x0", "v")


def ddpm_training_loss(
    s: Schedule,
    model: Callable[[Any, Any], Any],
    x0: ArrayT,
    t: TimeLike,
    noise: ArrayT,
    *,
    prediction: str = "eps",
    reduction: str = "mean",
) -> Array | np.float64:
    """The DDPM training objective for one batch   (DDPM Alg. 1, L_simple of eq. 14):

        x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                      (DDPM eq. 4)
        loss   = mean || target - model(x_t, t) ||^2
        target = eps (``prediction="eps"``, Alg. 1), x0 (``"x0"``) or
                 v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (``"v"``, Salimans & Ho 2022)

    Randomness is explicit: the caller draws t ~ U{0, ..., T-1} and eps ~ N(0, I) (Alg. 1,
    lines 3-4) and passes them in; the gradient step (line 5) is the caller's as well.
    x0, noise: arrays of shape (B, ...); t: int or integer array (B,); ``model(x_t, t)`` returns
    the prediction with x_t's shape. Returns ``simple_loss(target, prediction, reduction)``.
    The fused form for eps-prediction, which never stores eps, is ``diffmath.kernels.q_sample``
    with ``seed=`` followed by ``diffmath.kernels.simple_loss`` with the same seed.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
    if reduction not in ("mean", "none", "sum"):
        raise ValueError(f"reduction must be 'mean', 'none' or 'sum'; got {reduction!r}")
    if not callable(model):
        raise TypeError(f"model must be callable model(x_t, t); got {type(model).__name__}")
    x_t = forward.q_sample(s, x0, t, noise)
    pred = model(x_t, t)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = parameterization.v_from_x0_eps(s, t, x0, noise)
    return simple_loss(target, pred, reduction)


def _bpd_per_sample(x):
    return backend(x).mean_over_non_batch(x) / LN2


def vb_terms_bpd(
    s: Schedule, model_mean: ArrayT, model_log_var: ArrayT, x0: ArrayT, x_t: ArrayT, t: TimeLike, bins: int = 256
) -> Array:
    """One term of the variational bound, in bits per dimension, per sample (DDPM eq. 5):

    t > 0:  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || N(model_mean, e^model_log_var))
    t = 0:  L_0 = -log p(x0 | x_1) with the discretized Gaussian decoder
            (``discretized_gaussian_log_likelihood`` with log_scale = model_log_var / 2 and
            ``bins`` levels: 256 for 8-bit data, 17 for scikit-learn's 0..16 digits).

    Index t (0-based) is the paper's step t+1. Shapes (B, ...); t: int or (B,). Returns (B,).
    The true posterior uses the clipped log variance (Improved DDPM), as guided-diffusion.
    """
    from .posterior import q_posterior_mean_variance

    check_schedule(s)
    x_t = check_float(x_t, "x_t")
    x0 = check_like(x0, x_t, "x0", "x_t")
    model_mean = check_like(model_mean, x_t, "model_mean", "x_t")
    model_log_var = check_like(model_log_var, x_t, "model_log_var", "x_t")
    t = check_t(t, s.num_timesteps, x_t)
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    kl = _bpd_per_sample(normal_kl(upcast(true_mean), upcast(true_log_var), upcast(model_mean), upcast(model_log_var)))
    nll = -_bpd_per_sample(
        discretized_gaussian_log_likelihood(upcast(x0), upcast(model_mean), 0.5 * upcast(model_log_var), bins=bins)
    )
    is_first = (t == 0) if not isinstance(t, int) else t == 0
    if isinstance(is_first, bool):
        return nll if is_first else kl
    if is_tensor(kl):
        return torch.where(is_first.to(kl.device), nll, kl)
    return np.where(np.asarray(is_first), nll, kl)


def prior_bpd(s: Schedule, x0: ArrayT) -> ArrayT:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits per dimension, per sample (DDPM eq. 5). (B,)."""
    from .forward import q_mean_variance

    check_schedule(s)
    x0 = check_float(x0, "x0")
    if np.ndim(x0) < 1:
        raise ValueError("x0 must have a batch dimension, shape (B, ...)")
    T = s.num_timesteps
    mean, _, log_var = q_mean_variance(s, upcast(x0), T - 1)
    return _bpd_per_sample(normal_kl(mean, log_var, 0.0, 0.0))


def _fixed_log_variance_table(s: Schedule, variance: str) -> np.ndarray:
    """``fixed_log_variance``'s (T,) table, built once per schedule and variance (read-only)."""

    def build(s):
        if variance == "small":
            return s.posterior_log_variance_clipped
        with np.errstate(divide="ignore"):
            log_sigma2 = np.log(s.betas)
        log_sigma2[0] = s.posterior_log_variance_clipped[0]
        return log_sigma2

    return schedule_table(s, ("fixed_log_variance", variance), build)


def fixed_log_variance(s: Schedule, t: TimeLike, variance: str = "small") -> Array | np.float64:
    """log sigma_t^2 of a reverse step with fixed variance (Ho et al. 2020, sec. 3.2):

    "small": log beta_tilde_t, the clipped posterior log variance (``posterior_log_variance_clipped``);
    "large": log beta_t, except at t = 0 where it is the clipped posterior log variance
    log beta_tilde_1 too (guided-diffusion's FIXED_LARGE; log beta_0 would make the decoder
    L_0 almost a delta).

    float64 of t's shape (a tensor on t's device for tensor t).
    """
    check_schedule(s)
    check_variance(variance)
    t = check_t(t, s.num_timesteps)
    return gather_t(_fixed_log_variance_table(s, variance), t)


def vlb_weight(s: Schedule, t: TimeLike, variance: str = "small") -> Array | np.float64:
    """lambda_t with L_{t-1} = lambda_t * ||eps - eps_theta||^2 for a model with fixed variance
    sigma_t^2 and mean mu_theta = (x_t - beta_t/sqrt(1 - abar_t) eps_theta)/sqrt(alpha_t):

    lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))            (DDPM eq. 12)

    sigma_t^2 = posterior variance ("small") or beta_t ("large"); at t = 0 both use the
    clipped posterior variance posterior_variance[1] (``fixed_log_variance``).
    Nats per element. t: int or integer array (B,); returns float64 of t's shape (a tensor
    on t's device for tensor t). Infinite where alpha_t = 0 (beta_t = 1).
    """
    check_schedule(s)
    check_variance(variance)
    t = check_t(t, s.num_timesteps)
    log_sigma2 = _fixed_log_variance_table(s, variance)
    with np.errstate(divide="ignore"):
        log_w = 2 * np.log(s.betas) - LN2 - log_sigma2 - np.log1p(-s.betas) - s.log_one_minus_alphas_cumprod
        w = np.exp(log_w)
    return gather_t(w, t)


def snr_weight(
    s: Schedule, t: TimeLike, kind: str = "min_snr", gamma: float = 5.0, prediction: str = "eps"
) -> Array | np.float64:
    """Loss weights from the signal-to-noise ratio SNR_t = abar_t / (1 - abar_t).

    ``kind="snr"``: SNR_t. ``kind="min_snr"`` (Hang et al. 2023, "Efficient diffusion training
    via min-SNR weighting"): the weight that turns each parameterisation's MSE into
    min(SNR_t, gamma) times the x0-MSE: min(SNR, gamma)/SNR for eps-prediction, min(SNR, gamma)
    for x0-prediction, min(SNR, gamma)/(SNR + 1) for v-prediction. Returns t's shape.
    """
    check_schedule(s)
    t = check_t(t, s.num_timesteps)
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"prediction must be 'eps', 'x0' or 'v'; got {prediction!r}")
    log_snr = s.log_snr
    if kind == "snr":
        return gather_t(np.exp(log_snr), t)
    if kind != "min_snr":
        raise ValueError(f"kind must be 'snr' or 'min_snr'; got {kind!r}")
    if not (np.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be finite and > 0; got gamma = {gamma}")
    snr = np.exp(log_snr)
    with np.errstate(over="ignore"):
        if prediction == "eps":
            w = np.minimum(1.0, gamma * np.exp(-log_snr))  # min(SNR, g)/SNR
        elif prediction == "x0":
            w = np.minimum(snr, gamma)
        else:
            # min(SNR, g)/(SNR + 1) = min(SNR, g) * (1 - abar)
            w = np.minimum(snr, gamma) * np.exp(s.log_one_minus_alphas_cumprod)
    return gather_t(w, t)


def dsm_loss(score_pred, x_noisy, x0, sigma):
    """Denoising score matching with the NCSN weighting lambda(sigma) = sigma^2
    (Song & Ermon 2019, eq. 2 and 6):

    loss = mean_batch [ 1/2 sigma^2 sum_dims || score_pred + (x_noisy - x0) / sigma^2 ||^2 ]

    score_pred, x_noisy, x0: shape (B, ...); sigma: a positive float or an array of shape (B,).
    Returns a scalar.
    """
    score_pred = check_float(score_pred, "score_pred")
    x_noisy = check_like(x_noisy, score_pred, "x_noisy", "score_pred")
    x0 = check_like(x0, score_pred, "x0", "score_pred")
    sigma = check_positive(sigma, "sigma", allow_array=True)
    if np.ndim(sigma) > 1 or (np.ndim(sigma) == 1 and sigma.shape[0] != score_pred.shape[0]):
        raise ValueError(
            f"sigma must be a float or have shape (B,) = ({score_pred.shape[0]},); got shape {tuple(sigma.shape)}"
        )
    sp, xn, xz = upcast(score_pred), upcast(x_noisy), upcast(x0)
    sig = broadcast_coef(sigma, sp)
    # sigma^2 ||s + (x_noisy - x0)/sigma^2||^2 written as ||sigma s + (x_noisy - x0)/sigma||^2: no
    # sigma^2, which underflows (and gives 0 * inf) for sigma below ~1e-19 in float32
    r = sig * sp + (xn - xz) / sig
    per = 0.5 * backend(sp).sum_over_non_batch(r * r)
    return per.mean()


def learned_range_log_variance(s: Schedule, t: TimeLike, v: ArrayT) -> ArrayT:
    """Improved DDPM's learned variance (Nichol & Dhariwal 2021, eq. 15):

    log Sigma_theta = frac * log beta_t + (1 - frac) * log beta_tilde_t,  frac = (v + 1) / 2,

    with log beta_tilde the clipped posterior log variance. v: the network's raw output in
    [-1, 1], shape (B, ...); t: int or (B,). Returns the log variance of v's shape.
    """
    check_schedule(s)
    v = check_float(v, "v")
    t = check_t(t, s.num_timesteps, v)
    vc = upcast(v)
    frac = (vc + 1) / 2
    with np.errstate(divide="ignore"):
        max_log = np.log(s.betas)
    out = frac * gather(max_log, t, vc) + (1 - frac) * gather(s.posterior_log_variance_clipped, t, vc)
    return restore(out, v)
