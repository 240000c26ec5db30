"""The sampler loops of ``diffmath.pipeline.generate.generate``: each takes one chunk of starts
x_T and a ``LoadedModel`` (``diffmath.pipeline.loaded``) and returns the chunk's samples, the
per-step updates in the fused kernels (``diffmath.kernels``) or in the samplers of
``diffmath.samplers`` (pc and ode: ``generate`` calls ``samplers.sample_pc`` and
``samplers.sample_ode`` on ``sde_score`` itself).

Samplers (``--sampler``):

- ``ddpm``: ancestral sampling (DDPM Alg. 2) with ``kernels.ddpm_step`` (noise from the
  in-kernel Philox stream), on the schedule respaced to ``--steps`` (Improved DDPM) when
  steps < T, variance "small" (beta_tilde). A model with a learned variance uses it: each
  step is N(posterior mean, exp(learned_range_log_variance)) built from the core, its noise
  ``kernels.randn`` at the (seed, offset) the kernel step would use (the same stream).
- ``ddim``: ``kernels.ddim_step`` over ``samplers.ddim_pairs(T, steps)`` with ``--eta``.
- ``em``: Euler-Maruyama on the reverse VP-SDE with ``kernels.euler_maruyama_step``.
- ``pc``: predictor-corrector, ``samplers.sample_pc`` (reverse-diffusion predictor + one Langevin
  corrector step, snr 0.16; score_sde's VP setting) on a VP-SDE with N = steps. The corrector's
  step size uses the batch-mean norms of the score and the noise (score_sde's
  ``LangevinCorrector``, ``sample_pc``'s default): per-sample norms blow up in low
  dimension, where a sample near a mode has a score near zero.
- ``ode``: the probability-flow ODE, ``samplers.sample_ode`` (scipy RK45, rtol = atol = 1e-5).
- ``euler``, ``heun``, ``edm``, ``euler-a``, ``dpmpp-2m``, ``dpmpp-2m-sde``, ``dpmpp-3m-sde``,
  ``unipc``, ``lms``: the sigma-space solvers of ``diffmath.samplers`` on
  ``Denoiser.from_schedule`` around the network, over ``--sigmas karras|exponential|schedule``
  (``generate``); ``--steps`` levels (Heun/EDM: 2 steps - 1 model evaluations).

The SDE samplers (em, pc, ode) get their score from the same denoiser as the sigma-space
solvers (``sde_score``): the run's schedule is matched to ``sde.VPSDE(beta_min=0.1,
beta_max=20, N=T)`` (the continuous limit of the linear schedule; Song et al. 2021, App. B;
for ``named_schedule("linear", T)`` it is exact), time t has sigma = s(t)/m(t), and
score(x_t, t) = (D(x_t/m; sigma) - x_t/m) / (sigma^2 m) (Tweedie;
``denoiser.score_from_denoiser``) with D = ``Denoiser.from_schedule`` of the network, its time
interpolated in log sigma on the table and clamped to the table's ends. For an eps model this
is -eps/s(t). For other schedules this still queries the model at the matching noise level.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import losses, posterior
from ..schedules import timesteps
from .loaded import LoadedModel

__all__ = [
    "SOLVER_SAMPLERS",
    "matched_vpsde",
    "sde_score",
    "loop_ddim",
    "loop_ddpm",
    "loop_em",
    "solver_ladder",
    "loop_solver",
    "guided_solver_denoiser",
    "run_denoiser",
]

#: --sampler name -> the sigma-space solver of ``diffmath.samplers`` (``SOLVERS``)
SOLVER_SAMPLERS = {
    "euler": "euler",
    "heun": "heun",
    "edm": "edm",
    "euler-a": "euler_ancestral",
    "dpmpp-2m": "dpmpp_2m",
    "dpmpp-2m-sde": "dpmpp_2m_sde",
    "dpmpp-3m-sde": "dpmpp_3m_sde",
    "unipc": "unipc",
    "lms": "lms",
}


# ----------------------------------------------------------------------------- VP-SDE view
def matched_vpsde(lm: LoadedModel, N: int | None = None):
    """The VP-SDE the score samplers (em, pc, ode) run on: ``VPSDE(beta_min=0.1, beta_max=20,
    N)`` (N = T by default), the continuous limit of the linear schedule (module docstring)."""
    from ..sde import VPSDE

    return VPSDE(beta_min=0.1, beta_max=20.0, N=lm.schedule.num_timesteps if N is None else N)


def sde_score(lm: LoadedModel, sde):
    """score(x_t, t) at continuous VP-SDE time t in (0, 1] from the one denoiser of the run:
    ``denoiser.score_from_denoiser`` (Tweedie, (D(x_t/m; sigma) - x_t/m)/(sigma^2 m) with
    sigma = s(t)/m(t)) around ``Denoiser.from_schedule`` of the network, the classifier-free
    guided denoiser (``guided_solver_denoiser``) for a conditional request. The network time
    is t(sigma) interpolated in log sigma on the table, clamped to its ends where sigma(t)
    leaves it (``clamp_time=True``: below sigma_0 near t = eps, above sigma_{T-1} for a
    schedule whose last sigma is below the SDE's sigma(1))."""
    from ..denoiser import score_from_denoiser

    return score_from_denoiser(run_denoiser(lm, clamp_time=True), sde)


def run_denoiser(lm: LoadedModel, clamp_time: bool = False):
    """D(x; sigma) of the run's network (``Denoiser.from_schedule`` with its prediction type),
    or for a conditional request the classifier-free guided one (``guided_solver_denoiser``).
    ``clamp_time``: as ``Denoiser.from_schedule``'s."""
    from ..denoiser import Denoiser

    if lm.labels is not None:
        return guided_solver_denoiser(lm, clamp_time=clamp_time)
    C = lm.data_shape[0]
    return Denoiser.from_schedule(
        lambda x_t, t: lm.forward(x_t.float(), t)[:, :C], lm.schedule, lm.config.prediction, clamp_time=clamp_time
    )


# ----------------------------------------------------------------------------- loops
def _kernels():
    from .objective import kernels_module as k

    return k()


def loop_ddim(lm, x, seed, start, n_total, steps, eta, progress, clip_x0=None):
    from ..samplers import ddim_pairs

    K = _kernels()
    s = lm.schedule
    D = int(np.prod(x.shape[1:]))
    pairs = ddim_pairs(s.num_timesteps, steps, "leading")
    from tqdm.auto import tqdm

    for k, (t, t_prev) in enumerate(tqdm(pairs, disable=not progress, desc="DDIM", leave=False)):
        tb = torch.full((x.shape[0],), int(s.timestep_map[t]), dtype=torch.long, device=x.device)
        eps = lm.eps_model(x, tb, clip_x0)
        off = (k * n_total + start) * D
        x = K.ddim_step(s, x, t, t_prev, eps, seed=seed, offset=off, eta=eta)
    return x


def loop_ddpm(lm, x, seed, start, n_total, steps, progress, clip_x0=None):
    K = _kernels()
    s0 = lm.schedule
    s = s0.respace(timesteps(s0.num_timesteps, steps, "leading")) if steps and steps < s0.num_timesteps else s0
    D = int(np.prod(x.shape[1:]))
    C = lm.data_shape[0]
    from tqdm.auto import tqdm

    T = s.num_timesteps
    for k, t in enumerate(tqdm(range(T - 1, -1, -1), disable=not progress, desc="DDPM", leave=False)):
        tm = torch.full((x.shape[0],), int(s.timestep_map[t]), dtype=torch.long, device=x.device)
        off = (k * n_total + start) * D
        if lm.config.learn_sigma:
            # the learned variance (Improved DDPM eq. 15) on the (respaced) chain, from the core
            from ..parameterization import eps_from_prediction, x0_from_prediction

            if lm.labels is None:
                out = lm.forward(x, tm)
                pred, v = out[:, :C], out[:, C:]
                x0 = x0_from_prediction(lm.config.prediction, s0, x, tm, pred)
            else:  # the guided eps; the variance of the conditional half
                from ..parameterization import x0_from_eps

                eps, v = lm.guided_eps(
                    x, tm, lambda xx, tt, p: eps_from_prediction(lm.config.prediction, s0, xx, tt, p)
                )
                x0 = x0_from_eps(s0, x, tm, eps)
            tl = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
            mean = posterior.q_posterior_mean(s, x0, x, tl)
            if t == 0:
                x = mean
            else:
                log_var = losses.learned_range_log_variance(s, tl, v)
                z = K.randn(x.shape, seed, off, device=x.device, dtype=x.dtype)  # the kernel steps' noise
                x = mean + torch.exp(0.5 * log_var) * z
        else:
            eps = lm.eps_model(x, tm, clip_x0)
            x = K.ddpm_step(s, x, t, eps, seed=seed, offset=off, variance="small")
    return x


def loop_em(lm, x, seed, start, n_total, steps, progress):
    from ..samplers import time_grid

    K = _kernels()
    sde = matched_vpsde(lm)
    score = sde_score(lm, sde)
    ts = time_grid(sde, steps)
    D = int(np.prod(x.shape[1:]))
    from tqdm.auto import tqdm

    n = len(ts) - 1
    for k in tqdm(range(n), disable=not progress, desc="Euler-Maruyama", leave=False):
        tb = torch.full((x.shape[0],), float(ts[k]), dtype=torch.float64, device=x.device)
        sc = score(x, tb)
        dt = float(ts[k + 1] - ts[k])
        if k == n - 1:  # the last step adds no noise (score_sde's noise_removal)
            x = K.euler_maruyama_step(sde, x, tb.to(x.dtype), dt, sc, noise=torch.zeros_like(x))
        else:
            x = K.euler_maruyama_step(sde, x, tb.to(x.dtype), dt, sc, seed=seed, offset=(k * n_total + start) * D)
    return x


def solver_ladder(lm: LoadedModel, steps: int, sigmas: str) -> np.ndarray:
    """The float64 ladder of ``steps`` levels then 0 for the sigma-space solvers (``generate``)."""
    from ..denoiser import schedule_sigmas
    from ..samplers import sigmas_exponential, sigmas_from_schedule, sigmas_karras

    tab = schedule_sigmas(lm.schedule)
    tab = tab[np.isfinite(tab)]
    lo, hi = float(tab[0]), float(tab[-1])
    if sigmas == "karras":
        return sigmas_karras(steps, lo, hi)
    if sigmas == "exponential":
        return sigmas_exponential(steps, lo, hi)
    return sigmas_from_schedule(lm.schedule, steps, "leading")


def loop_solver(lm, x, sampler, steps, sigmas, generator, progress, clip_x0=None):
    from ..samplers import SOLVERS

    D = run_denoiser(lm)
    if clip_x0 is not None:  # clip D = the predicted x0, as the ddim/ddpm loops do (diffusers' clip_sample)
        D0, c = D, float(clip_x0)
        D = lambda x_t, sigma: D0(x_t, sigma).clamp(-c, c)  # noqa: E731
    sig = solver_ladder(lm, steps, sigmas)
    fn = SOLVERS[SOLVER_SAMPLERS[sampler]]
    kw = {"generator": generator} if sampler in ("euler-a", "dpmpp-2m-sde", "dpmpp-3m-sde", "edm") else {}
    return fn(D, x.float() * math.sqrt(1.0 + float(sig[0]) ** 2), sig, progress=progress, **kw)


def guided_solver_denoiser(lm: LoadedModel, clamp_time: bool = False):
    """D_s(x, sigma) for the sigma-space solvers: ``guidance.guided_denoiser`` (one network call
    on [x; x] with labels [y; null], D_s = (1 - s) D_u + s D_c, the rescale on x - D = sigma eps)
    around ``Denoiser.from_schedule`` of the conditional network; s = 0 or 1 without rescale:
    one call on the null label or the labels. ``clamp_time``: as ``Denoiser.from_schedule``'s
    (the score samplers, ``sde_score``)."""
    from ..denoiser import Denoiser
    from ..guidance import guided_denoiser

    C = lm.data_shape[0]
    cur = {}
    D = Denoiser.from_schedule(
        lambda x_t, t: lm.forward(x_t.float(), t, cur["y"])[:, :C],
        lm.schedule,
        lm.config.prediction,
        clamp_time=clamp_time,
    )
    s, phi = lm.guidance, lm.guidance_rescale
    if phi == 0.0 and s in (0.0, 1.0):
        y = lm.labels if s == 1.0 else None

        def plain(x, sigma):
            cur["y"] = y
            return D(x, sigma)

        return plain

    def den(x, sigma, y):
        cur["y"] = y
        return D(x, sigma)

    return guided_denoiser(den, lm.labels, s, rescale=phi, null_class=lm.num_classes)
