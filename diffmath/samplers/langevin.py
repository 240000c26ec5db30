"""Langevin dynamics: the unadjusted Langevin step, score_sde's Langevin corrector and NCSN's
annealed Langevin dynamics (Song & Ermon 2019)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._array import backend, broadcast_coef, is_tensor, restore, upcast
from ..checks import check_float, check_like, check_positive
from ._common import LoopModel, check_out_dtype, finish, model_t, progress_bar, randn_like, start

__all__ = [
    "langevin_step",
    "langevin_corrector_step",
    "corrector_step_size",
    "annealed_langevin",
    "geometric_sigmas",
    "annealed_step_sizes",
]


def _per_sample(c, x):
    """A step size: a positive float, or an array of shape (B,) (numpy or torch) returned in
    x's kind and compute dtype, shaped to broadcast over x's trailing dimensions."""
    if isinstance(c, numbers.Real):
        return check_positive(c, "step_size")
    c = check_positive(c, "step_size", allow_array=True)
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(f"step_size must be a float or have shape (B,) = ({x.shape[0]},); got shape {tuple(c.shape)}")
    return broadcast_coef(c, x)


def langevin_step(x, score, step_size, noise):
    """One step of unadjusted Langevin dynamics   (Song & Ermon 2019, eq. 4):

    x' = x + (step_size / 2) grad log p(x) + sqrt(step_size) noise,   noise ~ N(0, I).

    x, score (the value of grad log p at x), noise: shape (B, ...); step_size: a float > 0
    or an array of shape (B,). For p = N(mu, sigma^2) the chain is linear and its stationary
    variance is sigma^2 / (1 - step_size / (4 sigma^2)) (needs step_size < 4 sigma^2), not
    sigma^2: ULA is biased by O(step_size). Returns x' with x's shape and dtype.
    """
    x = check_float(x, "x")
    score = check_like(score, x, "score", "x")
    noise = check_like(noise, x, "noise", "x")
    xc = upcast(x)
    h = _per_sample(step_size, x)
    sq = math.sqrt(h) if isinstance(h, float) else backend(h).sqrt(h)
    return restore(xc + 0.5 * h * upcast(score) + sq * upcast(noise), x)


def _norms(v):
    v = v.reshape(v.shape[0], -1)
    return torch.linalg.vector_norm(v, dim=1) if is_tensor(v) else np.linalg.norm(v, axis=1)


def corrector_step_size(score_norm, noise_norm, snr: float, alpha: float = 1.0):
    """score_sde's adaptive Langevin step  step = 2 alpha (snr ||noise|| / ||score||)^2
    (Song et al. 2021, Alg. 4-5; score_sde ``LangevinCorrector``). Where ||score|| = 0 the
    step is 0 (no move) rather than infinite."""
    ops = backend(score_norm)
    safe = ops.where(score_norm > 0, score_norm, 1.0 + 0 * score_norm)
    return ops.where(score_norm > 0, 2.0 * alpha * (snr * noise_norm / safe) ** 2, 0 * score_norm)


def langevin_corrector_step(score, x, snr: float, noise, alpha: float = 1.0, norm: str = "batch"):
    """score_sde's Langevin corrector  (Song et al. 2021, Alg. 4-5; score_sde ``LangevinCorrector``):

    step = 2 alpha (snr ||noise|| / ||score||)^2,
    x'   = x + step score + sqrt(2 step) noise  = ``langevin_step(x, score, 2 step, noise)``.

    ``score`` is the score's value at x (the score of the current marginal p_t); norms are
    over the non-batch dims. ``norm="batch"`` (the default): score_sde's code, which uses the
    batch means of ||noise|| and ||score|| (one step for the whole batch; in the limit of a
    large batch the step is deterministic, which ``oracle.GaussianData.exact_sde_output``
    models exactly). ``norm="sample"`` (opt-in): one step per sample, as Alg. 4-5 read
    literally (docs/design.md, "Choices"). Warning: in dimension 1 and 2 the per-sample step has heavy tails
    (||score|| -> 0 near the mode gives a huge step; in 1-D P(|x' - x| > r) ~ c / r, so the
    output has no finite variance; on N(0.5, 0.1^2) data a PC run of 4000 samples gave
    variance 24.9 instead of 0.01): see docs/samplers.md. In high dimension the norms
    concentrate and the two agree. score, x, noise: (B, ...); snr > 0, alpha > 0.
    """
    x = check_float(x, "x")
    score = check_like(score, x, "score", "x")
    noise = check_like(noise, x, "noise", "x")
    snr = check_positive(snr, "snr")
    alpha = check_positive(alpha, "alpha")
    if norm not in ("sample", "batch"):
        raise ValueError(
            f"norm must be 'batch' (score_sde's batch means, the default) or 'sample' (per-sample step); got {norm!r}"
        )
    sc, nc = upcast(score), upcast(noise)
    sn, nn = _norms(sc), _norms(nc)
    if norm == "batch":
        sn, nn = sn.mean() + 0 * sn, nn.mean() + 0 * nn
    step = corrector_step_size(sn, nn, snr, alpha)
    xc = upcast(x)
    h = broadcast_coef(2.0 * step, xc)
    return restore(xc + 0.5 * h * sc + backend(h).sqrt(h) * nc, x)


def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, num: int = 10) -> np.ndarray:
    """NCSN's noise ladder sigma_1 > ... > sigma_L, a geometric sequence from sigma_max to
    sigma_min (Song & Ermon 2019, Sec. 4.2), float64 of shape (num,)."""
    check_positive(sigma_min, "sigma_min")
    check_positive(sigma_max, "sigma_max")
    if not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min; got sigma_max = {sigma_max}, sigma_min = {sigma_min}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2:
        raise ValueError(f"num must be an integer >= 2; got num = {num!r}")
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), int(num)))


def _check_sigmas(sigmas) -> np.ndarray:
    sig = np.asarray(sigmas.detach().cpu().numpy() if is_tensor(sigmas) else sigmas, dtype=np.float64)
    if sig.ndim != 1 or sig.size < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D array; got shape {sig.shape}")
    if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        i = int(np.argmax(~np.isfinite(sig) | (sig <= 0)))
        raise ValueError(f"sigmas must be finite and > 0; got sigmas[{i}] = {sig[i]}")
    if sig.size > 1 and np.any(np.diff(sig) >= 0):
        i = int(np.argmax(np.diff(sig) >= 0))
        raise ValueError(
            f"sigmas must be strictly descending; got sigmas[{i}] = {sig[i]} <= sigmas[{i + 1}] = {sig[i + 1]}"
        )
    return sig


def annealed_step_sizes(sigmas, step_lr: float) -> np.ndarray:
    """alpha_i = step_lr * sigma_i^2 / sigma_L^2 (Song & Ermon 2019, Alg. 1), float64 (L,)."""
    sig = _check_sigmas(sigmas)
    step_lr = check_positive(step_lr, "step_lr")
    return step_lr * (sig / sig[-1]) ** 2


def annealed_langevin(
    score_model,
    sigmas,
    shape=None,
    *,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    denoise: bool = False,
    out_dtype=None,
):
    """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Alg. 1):

    for i = 1..L:  alpha_i = step_lr sigma_i^2 / sigma_L^2
        repeat n_steps_each:  x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z

    ``score_model(x, sigma)`` gets sigma as an array of shape (B,) (x's kind) holding the
    current level. Starts from ``x_T`` or N(0, sigma_1^2 I) (NCSN started from uniform noise;
    the VE prior is the Gaussian). With ``denoise``, a final Tweedie step
    x <- x + sigma_L^2 s(x, sigma_L) (Jolicoeur-Martineau et al. 2021; NCSNv2).
    ``callback(i=, sigma=, x=)`` after each step. Returns x of ``shape``.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and sigma (docs/samplers.md).
    """
    if not callable(score_model):
        raise TypeError(f"score_model must be callable score_model(x, sigma); got {type(score_model).__name__}")
    sig = _check_sigmas(sigmas)
    alphas = annealed_step_sizes(sig, step_lr)
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, (int, np.integer)) or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be an integer >= 1; got n_steps_each = {n_steps_each!r}")
    x, generator = start(shape, generator, x_T, scale=float(sig[0]))
    out_dtype = check_out_dtype(out_dtype, x)
    total = len(sig) * int(n_steps_each)
    model = LoopModel(score_model, "score_model", "annealed_langevin", total, tname="sigma")
    bar = progress_bar(None, total, progress, "annealed Langevin")
    try:
        for i, (sigma, a) in enumerate(zip(sig.tolist(), alphas.tolist())):
            for _ in range(int(n_steps_each)):
                score = model(x, model_t(sigma, x, integer=False))
                x = langevin_step(x, score, a, randn_like(x, generator))
                model.step += 1
                bar.update(1)
                if callback is not None:
                    callback(i=i, sigma=sigma, x=x)
        if denoise:
            score = model(x, model_t(sig[-1], x, integer=False))
            x = restore(upcast(x) + float(sig[-1]) ** 2 * upcast(score), x)
    finally:
        bar.close()
    return finish(x, out_dtype)
