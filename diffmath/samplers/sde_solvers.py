"""Reverse-time SDE solvers (Song et al. 2021): Euler-Maruyama, the reverse-diffusion
predictor and the predictor-corrector sampler (Alg. 1-5, score_sde ``sampling.py``)."""

from __future__ import annotations

import math

import numpy as np

from .._array import restore, upcast
from ..checks import check_dt, check_eps, check_float, check_like, check_pc_args, check_sde, check_time
from ..sde import SDE, ReverseSDE
from ._common import LoopModel, check_out_dtype, check_score_args, finish, progress_bar, randn_like, start
from .langevin import langevin_corrector_step

__all__ = ["euler_maruyama_step", "reverse_diffusion_step", "sample_sde", "sample_pc", "time_grid"]


def _check_end(t, dt, name="t + dt"):
    tt = check_time(t)
    end = tt + dt
    bad = (end < 0) | (end > 1)
    if bool(bad.any()):
        t_bad = float(tt[bad].reshape(-1)[0]) if tt.ndim else float(tt)
        raise ValueError(f"{name} must stay in [0, 1]; got t = {t_bad}, dt = {dt}")


def euler_maruyama_step(rsde, x, t, dt, noise=None):
    """One Euler-Maruyama step of dx = drift dt + g dw   (Song et al. 2021, App. G):

    x' = x + drift(x, t) dt + g(t) sqrt(|dt|) noise

    ``rsde``: a ``ReverseSDE`` (``sde.reverse(score_fn)``, drift f - g^2 score) with dt < 0,
    or a forward ``SDE`` with dt > 0. x, noise: (B, ...); t: float or (B,); ``noise=None``
    gives the mean (score_sde's final noise-free step). Returns x' (x's shape and dtype).
    """
    if not isinstance(rsde, (SDE, ReverseSDE)):
        raise TypeError(f"rsde must be an SDE or the ReverseSDE from sde.reverse(score_fn); got {type(rsde).__name__}")
    x = check_float(x, "x")
    dt = check_dt(dt, reverse=isinstance(rsde, ReverseSDE))
    _check_end(t, dt)
    drift, g = rsde.sde(x, t)
    xc = upcast(x)
    out = xc + upcast(drift) * dt
    if noise is not None:
        noise = check_like(noise, x, "noise", "x")
        out = out + upcast(g) * math.sqrt(abs(dt)) * upcast(noise)
    return restore(out, x)


def reverse_diffusion_step(rsde, x, t, noise=None, *, t_score=None):
    """The reverse-diffusion predictor  (Song et al. 2021, eq. 46-47, score_sde
    ``ReverseDiffusionPredictor``): with (f, G) the forward ``discretize`` at t,

    x' = x - f + G^2 score(x, t) + G noise,

    i.e. x - rf + G noise with (rf, G) = ``rsde.discretize(x, t)``. For the VP SDE this is
    DDPM's ancestral step in the score form (Song et al. 2021, Alg. 3 predictor).
    ``noise=None`` gives the mean. ``t_score`` (default t) evaluates the score at another
    time than the chain index (the loop's last level: index 0 at t = 0, score at eps).
    Returns x' (x's shape and dtype).
    """
    if not isinstance(rsde, ReverseSDE) or rsde.probability_flow:
        raise TypeError("rsde must be the ReverseSDE from sde.reverse(score_fn) (probability_flow=False)")
    x = check_float(x, "x")
    rf, G = rsde.discretize(x, t, t_score=t_score)
    out = upcast(x) - upcast(rf)
    if noise is not None:
        noise = check_like(noise, x, "noise", "x")
        out = out + upcast(G) * upcast(noise)
    return restore(out, x)


def _check_n(steps, sde, name="steps"):
    if steps is None:
        return sde.N
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 1; got {steps!r}")
    if steps < 1:
        raise ValueError(f"{name} must be >= 1; got {name} = {steps}")
    return int(steps)


def time_grid(sde, steps=None, eps=None) -> np.ndarray:
    """The uniform grid t_k = 1 - k (1 - eps)/steps, k = 0..steps (float64, steps + 1 points)
    of the Euler-Maruyama, Heun and predictor-corrector loops: ``steps`` steps from T = 1 to
    ``eps``."""
    check_sde(sde)
    eps = check_eps(sde, eps)
    n = _check_n(steps, sde)
    return np.linspace(sde.T, eps, n + 1)


def _full_t(t, x):
    """t as a float array of shape (B,) in x's kind, for batched coefficient gathers."""
    from ._common import model_t

    return model_t(t, x, integer=False)


def sample_sde(
    score_fn,
    sde: SDE,
    shape=None,
    *,
    steps=None,
    eps=None,
    denoise: bool = True,
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    out_dtype=None,
):
    """Reverse-time SDE sampling by Euler-Maruyama (Song et al. 2021, eq. 6 and App. G):
    x_1 ~ prior, then ``euler_maruyama_step`` on ``time_grid(sde, steps, eps)`` (default
    ``sde.N`` steps down to eps = 1e-3 for VP/sub-VP, 1e-5 for VE). With ``denoise`` the
    last step adds no noise (score_sde's ``noise_removal``).

    ``score_fn(x, t)`` gets t as a float array (B,) of x's kind. ``callback(t=, x=)`` after
    each step. Returns x_eps of ``shape``.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and t (docs/samplers.md).
    """
    check_score_args(sde, score_fn)
    ts = time_grid(sde, steps, eps)
    x, generator = start(shape, generator, x_T, scale=sde.prior_std)
    out_dtype = check_out_dtype(out_dtype, x)
    n = len(ts) - 1
    model = LoopModel(score_fn, "score_fn", "sample_sde", n)
    rsde = sde.reverse(model)
    for k in progress_bar(range(n), n, progress, "Euler-Maruyama"):
        model.step = k
        last = k == n - 1
        noise = None if (last and denoise) else randn_like(x, generator)
        x = euler_maruyama_step(rsde, x, _full_t(ts[k], x), ts[k + 1] - ts[k], noise)
        if callback is not None:
            callback(t=float(ts[k + 1]), x=x)
    return finish(x, out_dtype)


def sample_pc(
    score_fn,
    sde: SDE,
    shape=None,
    *,
    steps=None,
    eps=None,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    corrector_norm: str = "batch",
    alpha: float = 1.0,
    denoise: bool = True,
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    out_dtype=None,
):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1; score_sde ``get_pc_sampler``).
    With the default reverse-diffusion predictor and Langevin corrector this is Song et al.
    2021, Alg. 2-3 (VE and VP SDEs), run as score_sde runs them: corrector, then predictor.

    At each level: ``n_corrector_steps`` Langevin corrector steps
    (``langevin_corrector_step`` with ``snr``, ``alpha``, ``corrector_norm``), then one
    predictor step; the last predictor step adds no noise when ``denoise``.
    ``corrector_norm="batch"`` (default) is score_sde's step from the batch means of the
    norms; ``"sample"`` is the opt-in per-sample step, heavy-tailed in dimension 1-2 (no
    finite output variance in 1-D; ``langevin_corrector_step``, docs/samplers.md).

    predictor="euler_maruyama": the uniform grid ``time_grid(sde, steps, eps)``.
    predictor="reverse_diffusion": the SDE's own chain, levels t_i = i/(N - 1) for
    i = N-1, ..., 0 (``discretize``'s index), the score evaluated at max(t_i, eps);
    ``steps`` must be None or ``sde.N`` (build the SDE with N = steps).
    corrector="langevin" or "none". ``score_fn(x, t)`` gets t as a float array (B,).
    ``callback(t=, x=)`` after each level. Returns a sample of ``shape``.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and t (docs/samplers.md).
    """
    check_score_args(sde, score_fn)
    eps = check_eps(sde, eps)
    snr, alpha, n_corrector_steps = check_pc_args(snr, alpha, n_corrector_steps)
    if predictor not in ("euler_maruyama", "reverse_diffusion"):
        raise ValueError(f"predictor must be 'euler_maruyama' or 'reverse_diffusion'; got {predictor!r}")
    if corrector not in ("langevin", "none", None):
        raise ValueError(f"corrector must be 'langevin' or 'none'; got {corrector!r}")
    if corrector_norm not in ("sample", "batch"):
        raise ValueError(f"corrector_norm must be 'batch' (the default) or 'sample'; got {corrector_norm!r}")
    if predictor == "euler_maruyama":
        ts = time_grid(sde, steps, eps)
        levels = ts[:-1]
        score_ts = levels
    else:
        n = _check_n(steps, sde)
        if n != sde.N:
            raise ValueError(
                f"steps must equal sde.N = {sde.N} for the reverse-diffusion predictor (it follows the SDE's "
                f"discretization); got steps = {n}; build the SDE with N = {n}"
            )
        levels = np.arange(sde.N - 1, -1, -1) / max(sde.N - 1, 1)
        score_ts = np.maximum(levels, eps)
        ts = None
    x, generator = start(shape, generator, x_T, scale=sde.prior_std)
    out_dtype = check_out_dtype(out_dtype, x)
    n = len(levels)
    model = LoopModel(score_fn, "score_fn", "sample_pc", n)
    rsde = sde.reverse(model)
    for k in progress_bar(range(n), n, progress, "predictor-corrector"):
        model.step = k
        last = k == n - 1
        t_score = score_ts[k]
        if corrector == "langevin":
            for _ in range(int(n_corrector_steps)):
                score = rsde.score(x, _full_t(t_score, x))
                x = langevin_corrector_step(score, x, snr, randn_like(x, generator), alpha=alpha, norm=corrector_norm)
        noise = None if (last and denoise) else randn_like(x, generator)
        if predictor == "euler_maruyama":
            assert ts is not None  # set with the Euler-Maruyama grid above
            x = euler_maruyama_step(rsde, x, _full_t(ts[k], x), ts[k + 1] - ts[k], noise)
            t_next = float(ts[k + 1])
        else:
            x = _reverse_diffusion_at(rsde, x, levels[k], t_score, noise)
            t_next = float(levels[k])
        if callback is not None:
            callback(t=t_next, x=x)
    return finish(x, out_dtype)


def _reverse_diffusion_at(rsde, x, t_disc, t_score, noise):
    """The reverse-diffusion predictor at chain index round(t_disc (N-1)) with the score at
    t_score (= t_disc except at the last level t = 0, where the score needs t >= eps)."""
    return reverse_diffusion_step(rsde, x, _full_t(t_disc, x), noise, t_score=_full_t(t_score, x))
