"""Sampling from a trained run (``diffmath sample``): the glue between a checkpoint, the
sampler math and the fused kernels.

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

Classes and guidance (a run trained with ``--conditional``): ``classes`` asks for class
labels (``parse_classes``: an index, a range ``a-b``, a list, ``all``, or class names), the
samples split into equal blocks, one per class in the order asked (``class_labels``), and
each network call is classifier-free guided (``diffmath.guidance.guided``: the network runs
ONCE on the doubled batch [x; x] with labels [y; null], and eps = eps_u + s (eps_c - eps_u),
diffusers' scale s; ``guidance_rescale`` phi is Lin et al. 2023's rescale). Each sampler
converts the network's prediction (eps, x0 or v) to eps with its own conversion before the
combination (the discrete tables for ddpm/ddim; em/pc/ode and the sigma-space solvers guide
the denoiser, D_s = (1 - s) D_u + s D_c, the same combination of eps at one sigma), so
guidance applies identically to every parameterization (docs/guidance.md). s = 1 and s = 0
(without rescale) are evaluated with one network call on the labels or on the null class,
which gives the same numbers as the combination. A learned-variance network's variance
channels are sliced off before the combination, and ddpm uses the variance predicted by the
conditional half (GLIDE's and diffusers' DiT pipeline's choice: the variance is not guided).
Without ``classes`` a conditional run samples its unconditional model (the null label).

Precision (``--dtype``): the sampling state x stays float32 whatever the network's precision;
``dtype="bf16"``/``"fp16"`` runs the U-Net under ``torch.autocast`` in bfloat16/float16 (CPU or
CUDA), its output read back as float32 before each update (docs/samplers.md, "Precision of the
loop state"); ``"fp32"`` runs it in float32. ``dtype=None`` (the library default) keeps the
loaded model's own rule: bf16 autocast on CUDA for a run trained with bf16, float32 otherwise.

Noise: the start x_T and the kernel noise are keyed by (seed, global sample index), so the
samples do not depend on the chunking (``batch_size``) or on the number of processes; the
pc/ode samplers draw from a ``torch.Generator`` per chunk (those depend on the chunking).
Under ``torchrun`` each rank samples a contiguous share and rank 0 gathers and writes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import losses, posterior
from ..schedules import Schedule, timesteps
from .io import atomic_write_bytes, atomic_write_npz
from .plots import save_fig

__all__ = [
    "LoadedModel",
    "load_model",
    "generate",
    "sample_run",
    "save_grid",
    "save_class_grid",
    "parse_classes",
    "class_labels",
    "check_conditioning",
    "request_labels",
    "SAMPLERS",
    "DEFAULT_STEPS",
    "DEFAULT_GUIDANCE",
]

SAMPLERS = ("ddpm", "ddim", "em", "pc", "ode")
#: ``--dtype``: the U-Net's autocast precision (the sampling state stays float32)
NET_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "em": 500, "pc": 500, "ode": None}
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
SAMPLERS = SAMPLERS + tuple(SOLVER_SAMPLERS)
DEFAULT_STEPS.update({name: 20 for name in SOLVER_SAMPLERS})
LADDERS = ("karras", "exponential", "schedule")  # --sigmas; the default is "exponential" (``generate``)
# The guidance scale s of ``sample --class`` when --guidance is not given (diffusers' convention:
# 1 = the plain conditional model). Chosen on the demo's digits (README, docs/guidance.md).
DEFAULT_GUIDANCE = 1.5


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: TrainConfig  # noqa: F821
    schedule: Schedule
    data_shape: tuple
    bins: int | None
    step: int
    device: torch.device
    checkpoint: Path
    dtype: str | None = None  # a NET_DTYPES key; None: bf16 autocast on CUDA for a run trained with bf16
    # classifier-free guidance of a conditional run (``conditioned``): the requested class of
    # each sample of the batch, the scale s and the rescale phi; labels None: no labels
    labels: torch.Tensor | None = None
    guidance: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def conditioned(self, labels, guidance: float, guidance_rescale: float = 0.0) -> LoadedModel:
        """This model asked for ``labels`` (int64 (B,), one per sample of the batches it will get)
        with guidance scale ``guidance`` and rescale ``guidance_rescale`` (a copy; the network
        is shared). Checked by ``check_conditioning``."""
        import dataclasses

        y = None if labels is None else torch.as_tensor(np.asarray(labels, np.int64), device=self.device)
        return dataclasses.replace(self, labels=y, guidance=float(guidance), guidance_rescale=float(guidance_rescale))

    @torch.no_grad()
    def forward(self, x, t, y=None) -> torch.Tensor:
        """The raw network output (float32). The network runs under ``torch.autocast`` (CPU or
        CUDA) in bfloat16/float16 for ``dtype`` "bf16"/"fp16", in float32 for "fp32"; with
        ``dtype=None`` in bf16 autocast on CUDA for a run trained with bf16 (``config.bf16``).
        ``y``: class labels (a conditional network; None there is the null class)."""
        args = (x, t) if y is None else (x, t, y)
        ac = (
            NET_DTYPES[self.dtype]
            if self.dtype is not None
            else (torch.bfloat16 if (self.device.type == "cuda" and self.config.bf16) else torch.float32)
        )
        if ac != torch.float32:
            with torch.autocast(self.device.type, dtype=ac):
                return self.model(*args).float()
        return self.model(*args).float()

    def guided_eps(self, x, t, convert):
        """(eps, variance channels or None) for the labels of ``conditioned``: classifier-free
        guidance (``diffmath.guidance.guided``) of the network's prediction, each half turned
        into eps by ``convert(x, t, pred)`` (x, t and pred of the doubled batch) before the
        combination. The variance channels (learned variance) are the conditional half's.
        s = 1 or s = 0 without rescale: one network call on the labels or the null class."""
        from ..guidance import guided

        C = self.data_shape[0]
        s, phi = self.guidance, self.guidance_rescale
        if self.labels.shape[0] != x.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for a batch of {x.shape[0]}")
        if phi == 0.0 and s in (0.0, 1.0):
            out = self.forward(x, t, self.labels if s == 1.0 else None)
            return convert(x, t, out[:, :C]).float(), (out[:, C:] if self.config.learn_sigma else None)
        rest = {}

        def net(x2, t2, y2):
            out = self.forward(x2, t2, y2)
            rest["v"] = out[: x.shape[0], C:]  # the conditional half's
            return convert(x2, t2, out[:, :C])

        eps = guided(net, self.labels, s, rescale=phi, null_class=self.num_classes)(x, t)
        return eps, (rest["v"] if self.config.learn_sigma else None)

    def eps_model(self, x, t, clip_x0: float | None = None):
        """eps_theta(x, t) for integer t (B,): the eps/x0/v prediction converted to eps
        (``parameterization``); the variance channels of a learned-variance model dropped.

        With ``clip_x0 = c`` the implied x0 = (x - sqrt(1 - abar) eps)/sqrt(abar) is clipped to
        [-c, c] and eps recomputed from it (guided-diffusion's ``clip_denoised``; diffusers'
        ``clip_sample``), so a DDIM/DDPM step moves toward a denoised image inside the data range."""
        from ..parameterization import eps_from_prediction, eps_from_x0, x0_from_eps, x0_from_prediction

        C = self.data_shape[0]
        s, pred = self.schedule, self.config.prediction
        if self.labels is not None:
            eps, _ = self.guided_eps(x, t, lambda xx, tt, p: eps_from_prediction(pred, s, xx, tt, p))
            if clip_x0 is None:
                return eps.to(x.dtype)
            x0 = x0_from_eps(s, x.float(), t, eps).clamp(-clip_x0, clip_x0)
            return eps_from_x0(s, x.float(), t, x0).to(x.dtype)
        out = self.forward(x, t)[:, :C]
        if clip_x0 is None:
            return eps_from_prediction(pred, s, x, t, out).to(x.dtype)
        x0 = x0_from_prediction(pred, s, x, t, out).clamp(-clip_x0, clip_x0)
        return eps_from_x0(s, x.float(), t, x0).to(x.dtype)


def load_model(
    run=None, checkpoint=None, device: str = "auto", ema: bool = True, trust_unverified: bool = False
) -> LoadedModel:
    """The model of a run directory (its latest checkpoint) or of one checkpoint file, with the
    EMA weights (``ema=False``: the raw weights), in eval mode. The weights must match the
    SHA-256 of the checkpoint's JSON sidecar; one that cannot be verified (no sidecar, or no
    ``weights_sha256`` in it) is refused unless ``trust_unverified`` (``checkpoint.load_checkpoint``)."""
    from .checkpoint import RunError, check_class_count, latest_checkpoint, load_checkpoint
    from .config import TrainConfig
    from .distributed import resolve_device
    from .model import build_model, make_schedule

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of run (a run directory) or checkpoint (a step-NNNNNN file)")
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise RunError(f"--run {str(run)!r} is not a directory")
        ck = latest_checkpoint(run)
        if ck is None:
            raise RunError(f"--run {str(run)!r} holds no checkpoint (step-NNNNNN.json); train it first")
    else:
        ck = Path(checkpoint)
        if not ck.exists():
            raise RunError(f"--checkpoint {str(ck)!r} does not exist")
    meta, tensors = load_checkpoint(ck, trust_unverified=trust_unverified)
    try:
        config = TrainConfig.from_dict(meta["config"])
        data_shape = tuple(meta["data_shape"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{str(ck)!r} does not hold a usable diffmath config: {e}") from e
    check_class_count(config.num_classes, tensors, repr(str(ck)))
    dev = resolve_device(device)
    model = build_model(config, data_shape)
    prefix = "ema." if ema else "model."
    sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise RunError(f"the weights in {str(ck)!r} do not fit the model its config describes: {e}") from e
    model.to(dev).eval()
    return LoadedModel(model, config, make_schedule(config), data_shape, meta["bins"], meta["step"], dev, Path(ck))


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
    guided denoiser (``_guided_solver_denoiser``) for a conditional request. The network time
    is t(sigma) interpolated in log sigma on the table, clamped to its ends where sigma(t)
    leaves it (``clamp_time=True``: below sigma_0 near t = eps, above sigma_{T-1} for a
    schedule whose last sigma is below the SDE's sigma(1))."""
    from ..denoiser import Denoiser, score_from_denoiser

    C = lm.data_shape[0]
    if lm.labels is None:
        D = Denoiser.from_schedule(
            lambda x_t, t: lm.forward(x_t.float(), t)[:, :C], lm.schedule, lm.config.prediction, clamp_time=True
        )
    else:
        D = _guided_solver_denoiser(lm, Denoiser, clamp_time=True)
    return score_from_denoiser(D, sde)


# ----------------------------------------------------------------------------- loops
def _kernels():
    from .objective import kernels_module as k

    return k()


def _loop_ddim(lm, x, seed, start, n_total, steps, eta, progress, clip_x0=None):
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


def _loop_ddpm(lm, x, seed, start, n_total, steps, progress, clip_x0=None):
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


def _loop_em(lm, x, seed, start, n_total, steps, progress):
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


def _loop_solver(lm, x, sampler, steps, sigmas, generator, progress, clip_x0=None):
    from ..denoiser import Denoiser
    from ..samplers import SOLVERS

    C = lm.data_shape[0]
    if lm.labels is None:
        D = Denoiser.from_schedule(lambda x_t, t: lm.forward(x_t, t)[:, :C], lm.schedule, lm.config.prediction)
    else:
        D = _guided_solver_denoiser(lm, Denoiser)
    if clip_x0 is not None:  # clip D = the predicted x0, as the ddim/ddpm loops do (diffusers' clip_sample)
        D0, c = D, float(clip_x0)
        D = lambda x_t, sigma: D0(x_t, sigma).clamp(-c, c)  # noqa: E731
    sig = solver_ladder(lm, steps, sigmas)
    fn = SOLVERS[SOLVER_SAMPLERS[sampler]]
    kw = {"generator": generator} if sampler in ("euler-a", "dpmpp-2m-sde", "dpmpp-3m-sde", "edm") else {}
    return fn(D, x.float() * math.sqrt(1.0 + float(sig[0]) ** 2), sig, progress=progress, **kw)


def _guided_solver_denoiser(lm: LoadedModel, Denoiser, clamp_time: bool = False):
    """D_s(x, sigma) for the sigma-space solvers: ``guidance.guided_denoiser`` (one network call
    on [x; x] with labels [y; null], D_s = (1 - s) D_u + s D_c, the rescale on x - D = sigma eps)
    around ``Denoiser.from_schedule`` of the conditional network; s = 0 or 1 without rescale:
    one call on the null label or the labels. ``clamp_time``: as ``Denoiser.from_schedule``'s
    (the score samplers, ``sde_score``)."""
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


def default_clip(lm: LoadedModel):
    """The default ``clip_x0``: 1.0 for bounded images (data on a grid of ``bins`` levels in
    [-1, 1]: the digits, image folders), None (no clipping) for data with no such bound
    (``bins is None``): 2-D toy data, and the latents of a latent-diffusion U-Net, whose scaled
    values have unit variance and routinely leave [-1, 1]."""
    return 1.0 if len(lm.data_shape) == 3 and lm.bins is not None else None


def check_net_dtype(dtype):
    """A ``--dtype`` value: None or one of NET_DTYPES' keys (ValueError otherwise)."""
    if dtype is not None and dtype not in NET_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(NET_DTYPES)} (the U-Net's precision) or None; got {dtype!r}")
    return dtype


def generate(
    lm: LoadedModel,
    num_samples: int,
    *,
    sampler: str = "ddim",
    steps=None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
    clip_x0="auto",
    dtype=None,
    sigmas: str = "exponential",
    labels=None,
    guidance=None,
    guidance_rescale: float = 0.0,
) -> np.ndarray:
    """``num_samples`` samples as a float32 numpy array (N, *data_shape), not clipped.

    The sigma-space solvers (``SOLVER_SAMPLERS``: euler, heun, edm, euler-a, dpmpp-2m,
    dpmpp-2m-sde, dpmpp-3m-sde, unipc, lms) run on ``Denoiser.from_schedule`` around the network
    (its prediction type; the timestep interpolated in log sigma off the table), over ``steps``
    levels of the ladder ``sigmas``: "exponential" (the default: uniform in log sigma) or
    "karras" (rho = 7) between the schedule's sigma_min and sigma_max, or "schedule" (the
    schedule's own sigmas at leading timesteps), each then 0; the start is x_T sqrt(1 + sigma_0^2)
    (the VP prior N(0, I) in sigma space). The default is the ladder with the lowest exact KL for
    dpmpp-2m at 10 and 20 steps on linear, cosine, scaled-linear and sigmoid schedules of
    T = 1000 (docs/samplers.md, "Which ladder by default"): Karras rho = 7 puts most of a small
    budget at sigma >> 1, which a cosine schedule's sigma_max = 2e4 makes pure noise.

    ``dtype``: the U-Net's precision, "fp32", "bf16" or "fp16" (``torch.autocast`` on CPU or
    CUDA), or None for the loaded model's own (``LoadedModel.dtype``); the sampling state is
    float32 in every case.

    ``clip_x0``: for ddpm/ddim, clip the predicted x0 to [-c, c] at each step ("auto":
    ``default_clip``, c = 1 for images in [-1, 1], off for toy data and latents; None: off).
    The SDE samplers use the raw score.

    ``labels`` (a conditional run): the class of each sample, an int or an integer array (N,)
    in [0, num_classes); every sampler then uses the classifier-free guided prediction with
    scale ``guidance`` (default ``DEFAULT_GUIDANCE``) and rescale ``guidance_rescale``
    (module docstring; ``check_conditioning``). Without labels a conditional run samples its
    unconditional model (the null label). The start and the noise do not depend on the labels.

    Under torch.distributed (initialised) each rank draws a contiguous share and the result
    is gathered on every rank."""
    from ..samplers import sample_ode, sample_pc
    from .config import derive_seed

    steps = check_sampling(lm, num_samples, sampler, steps, eta, seed, batch_size, sigmas)
    labels, guidance, guidance_rescale = check_conditioning(lm, labels, guidance, guidance_rescale, num_samples)
    if clip_x0 == "auto":
        clip_x0 = default_clip(lm)
    if check_net_dtype(dtype) is not None:
        from dataclasses import replace

        lm = replace(lm, dtype=dtype)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = -(-num_samples // world)
    lo, hi = min(num_samples, rank * per), min(num_samples, (rank + 1) * per)
    shape = tuple(lm.data_shape)
    xT_all = torch.randn((num_samples,) + shape, generator=torch.Generator().manual_seed(derive_seed(seed, "x_T")))
    kseed = derive_seed(seed, "sample-philox") % (2**31 - 1)
    outs = []
    base = lm  # each chunk's samples get their labels (a conditional run)
    for a in range(lo, hi, batch_size):
        b = min(hi, a + batch_size)
        x = xT_all[a:b].to(lm.device)
        lm = base if labels is None else base.conditioned(labels[a:b], guidance, guidance_rescale)
        if sampler == "ddim":
            x = _loop_ddim(lm, x, kseed, a, num_samples, steps, eta, progress, clip_x0)
        elif sampler == "ddpm":
            x = _loop_ddpm(lm, x, kseed, a, num_samples, steps, progress, clip_x0)
        elif sampler == "em":
            x = _loop_em(lm, x, kseed, a, num_samples, steps, progress)
        elif sampler in SOLVER_SAMPLERS:
            g = torch.Generator(device=lm.device).manual_seed(derive_seed(seed, "chunk", a))
            x = _loop_solver(lm, x, sampler, steps, sigmas, g, progress, clip_x0)
        else:
            sde = matched_vpsde(lm)
            score = sde_score(lm, sde)
            g = torch.Generator(device=lm.device).manual_seed(derive_seed(seed, "chunk", a))
            if sampler == "pc":
                x = sample_pc(score, matched_vpsde(lm, steps), x_T=x, steps=steps, generator=g, progress=progress)
            else:
                x = sample_ode(score, sde, x_T=x, generator=g, progress=progress)
        outs.append(x.float().cpu())
    local = torch.cat(outs) if outs else torch.zeros((0,) + shape)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local.numpy())
        x = np.concatenate(parts).astype(np.float32)
    else:
        x = local.numpy().astype(np.float32)
    check_finite_samples(x, lm, sampler)
    return x


def check_sampling(lm: LoadedModel, num_samples, sampler, steps, eta, seed=0, batch_size=1, sigmas="exponential"):
    """``ValueError`` naming the argument if a sampling request is invalid; returns the number of
    steps (the sampler's default when ``steps`` is None; None for the adaptive ode sampler)."""
    from .config import MAX_SEED

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1]; got {seed!r}")
    T = lm.schedule.num_timesteps
    if steps is None:
        steps = DEFAULT_STEPS[sampler] or (T if sampler == "ddpm" else None)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if sampler in ("ddpm", "ddim") and steps > T:
        raise ValueError(f"steps must lie in [1, T] = [1, {T}] for --sampler {sampler}; got {steps}")
    if sigmas not in LADDERS:
        raise ValueError(f"sigmas must be one of {', '.join(LADDERS)}; got {sigmas!r}")
    if sampler in SOLVER_SAMPLERS and sigmas == "schedule" and steps > T:
        raise ValueError(f"steps must lie in [1, T] = [1, {T}] for --sigmas schedule; got {steps}")
    if sampler == "pc" and steps < 20:  # its predictor is the VP-SDE's discrete chain, beta_i = beta_max / N
        raise ValueError(
            f"steps must be >= 20 for --sampler pc (the VP-SDE chain needs beta_max / N = 20 / N <= 1); got {steps}"
        )
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"eta must be finite and >= 0; got {eta}")
    return steps


def unconditional_error(lm: LoadedModel, flag: str) -> ValueError:
    """The ValueError for a class or guidance request (``flag``) on an unconditional run."""
    return ValueError(
        f"{flag} needs a class-conditional run (diffmath train --conditional); {str(lm.checkpoint)!r} is unconditional "
        "(num_classes = 0)"
    )


def parse_classes(spec, num_classes: int, class_names=()) -> list[int]:
    """The class indices of a ``--class`` request, in order: an int; a string that is an index
    ``4``, an inclusive range ``0-9``, ``all`` (0 .. num_classes - 1), a class name (for a run on
    an ImageFolder layout; an integer is always read as an index), or a comma list of those
    (``1,3,5``, ``0-2,7``); or a list of ints. ``ValueError`` naming the value and the range
    [0, num_classes) for anything else."""
    K = int(num_classes)
    names = [str(c) for c in class_names]
    valid = f"[0, {K})" + (
        f" (the run's classes: {', '.join(f'{i} = {n}' for i, n in enumerate(names))})"
        if names and names != [str(i) for i in range(K)]
        else ""
    )
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError(f"class must be a class index, range, list or 'all'; got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        parts = [int(spec)]
    elif isinstance(spec, (list, tuple, np.ndarray)):
        parts = list(spec)
        if not parts:
            raise ValueError("class: the list of classes is empty")
        for p in parts:
            if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"class must hold integer class indices; got {p!r}")
        parts = [int(p) for p in parts]
    elif isinstance(spec, str):
        parts = []
        for p in (q.strip() for q in spec.split(",")):
            if not p:
                raise ValueError(f"class {spec!r}: an empty entry (expected e.g. 4, 0-9, 1,3,5 or all)")
            if p == "all":
                parts += list(range(K))
            elif p.lstrip("-").isdigit():
                parts.append(int(p))
            elif "-" in p and all(q.strip().isdigit() for q in p.split("-", 1)):
                lo, hi = (int(q) for q in p.split("-", 1))
                if lo > hi:
                    raise ValueError(f"class range {p!r} runs backwards; write it low-high, e.g. {hi}-{lo}")
                parts += list(range(lo, hi + 1))
            elif p in names:
                parts.append(names.index(p))
            else:
                raise ValueError(
                    f"class {p!r} is not a class index, a range a-b, 'all' or a class name; valid: {valid}"
                )
    else:
        raise TypeError(
            f"class must be an int, a string like '0-9' or '1,3,5' or 'all', or a list; got {type(spec).__name__}"
        )
    bad = [c for c in parts if not 0 <= c < K]
    if bad:
        raise ValueError(f"class {bad[0]} is outside [0, {K}): the run has {K} classes; valid: {valid}")
    return parts


def class_labels(classes, num_samples: int) -> np.ndarray:
    """The label of each of ``num_samples`` samples for the classes asked: an equal block per
    class, in the order given (``[c0]*n + [c1]*n + ...``). ``ValueError`` unless num_samples is a
    multiple of the number of classes."""
    classes = [int(c) for c in classes]
    k = len(classes)
    if num_samples % k:
        lo, hi = (num_samples // k) * k, (num_samples // k + 1) * k
        raise ValueError(
            f"num_samples = {num_samples} is not a multiple of the {k} classes asked (an equal number of each); use "
            + (f"{lo} or {hi}" if lo else f"{hi}")
        )
    return np.repeat(np.asarray(classes, np.int64), num_samples // k)


def check_conditioning(lm: LoadedModel, labels, guidance, guidance_rescale, num_samples: int):
    """Check a conditional sampling request before any work; returns (labels (N,) int64 or None,
    guidance scale s or None, rescale phi). ``ValueError`` (naming the value and its range) for:
    labels or guidance for an unconditional run; guidance without labels; labels outside
    [0, num_classes) or not one per sample; s negative or not finite; phi outside [0, 1]; s != 1
    for a run trained without label dropout (its null class never trained)."""
    import numbers

    given_g = guidance is not None
    given_r = guidance_rescale not in (None, 0, 0.0)
    for name, v, ok, rng in (
        ("guidance", guidance, lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
        ("guidance_rescale", guidance_rescale, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ):
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number {rng}; got {v!r}")
        if not ok(float(v)):
            raise ValueError(
                f"{name} must be {rng} (guidance: 0 unconditional, 1 conditional, > 1 guided); got {name} = {float(v)}"
            )
    K = lm.num_classes
    if K == 0:
        if labels is not None:
            raise unconditional_error(lm, "--class (labels)")
        if given_g or given_r:
            raise unconditional_error(lm, "--guidance" if given_g else "--guidance-rescale")
        return None, None, 0.0
    if labels is None:
        if given_g or given_r:
            raise ValueError(
                f"{'--guidance' if given_g else '--guidance-rescale'} needs --class: without labels a conditional run "
                "samples its unconditional model (the null label), which has nothing to guide toward"
            )
        return None, None, 0.0
    from ..guidance import check_labels

    y = check_labels(labels, K, "class")
    y = np.full(num_samples, y, np.int64) if isinstance(y, int) else y
    if y.shape[0] != num_samples:
        raise ValueError(f"labels must give one class per sample: {y.shape[0]} labels for num_samples = {num_samples}")
    s = float(DEFAULT_GUIDANCE if guidance is None else guidance)
    phi = float(guidance_rescale or 0.0)
    p = float(getattr(lm.config, "uncond_prob", 0.1))
    if p == 0 and (s != 1 or phi):
        raise ValueError(
            f"{str(lm.checkpoint)!r} was trained without label dropout (uncond_prob = 0): its null class never "
            "trained, "
            f"so only --guidance 1 (the plain conditional model) is meaningful; got guidance = {s}"
        )
    return y, s, phi


def check_finite_samples(x: np.ndarray, lm: LoadedModel, sampler: str) -> None:
    """``FloatingPointError`` if the samples hold NaN or inf: whatever the sampler, nothing
    non-finite is returned or written (a model with NaN weights gives NaN samples)."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows = int(bad.reshape(len(x), -1).any(axis=1).sum())
        raise FloatingPointError(
            f"sampling ({sampler}) gave non-finite values (NaN or inf) in {rows} of {len(x)} samples with the "
            "weights of "
            f"{str(lm.checkpoint)!r} (step {lm.step}): the model's outputs are not finite (damaged or diverged "
            "weights?); nothing was written"
        )


# ----------------------------------------------------------------------------- files
def save_grid(path, x: np.ndarray, nrow: int | None = None, scale: int = 4, title: str | None = None, limit: int = 100):
    """samples.png: images (N, C, H, W) in [-1, 1] tiled in a grid (the first ``limit``), or a
    scatter plot for 2-D points (N, 2). C = 1 is grey, C = 3 RGB; any other C (the latents of a
    latent-diffusion U-Net, e.g. 2 channels) shows each item's channels side by side in grey,
    clipped to [-1, 1]. ``nrow``: images per row (default: a square)."""
    x = np.asarray(x)
    if x.ndim == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(title or f"{len(x)} samples")
        fig.tight_layout()
        save_fig(fig, Path(path))
        plt.close(fig)
        return
    from PIL import Image

    x = x[:limit]
    if x.shape[1] not in (1, 3):  # channels side by side, one grey column between them
        n, C, H, W = x.shape
        gap = np.zeros((n, 1, H, 1), dtype=x.dtype)
        parts = [x[:, c : c + 1] for c in range(C)]
        x = np.concatenate([p for c, part in enumerate(parts) for p in ((gap, part) if c else (part,))], axis=3)
    n, C, H, W = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = np.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), 0.5, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = (
            np.clip(x[i], -1, 1) + 1
        ) / 2
    img = (grid * 255).round().astype(np.uint8)
    im = Image.fromarray(img[0] if C == 1 else img.transpose(1, 2, 0), mode="L" if C == 1 else "RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_class_grid(
    path, x: np.ndarray, labels, per_class: int = 10, names=(), title: str | None = None, scale: int = 4
):
    """samples.png of class-conditional samples: one row per class asked (in the order of
    their first sample), its first ``per_class`` samples side by side (images); for 2-D points a
    scatter plot coloured by class."""
    x, labels = np.asarray(x), np.asarray(labels)
    order = list(dict.fromkeys(int(c) for c in labels))
    if x.ndim == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        for c in order:
            pts = x[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, label=names[c] if c < len(names) else str(c))
        ax.set_aspect("equal")
        ax.legend(markerscale=4, fontsize=7, loc="best")
        ax.set_title(title or f"{len(x)} samples, {len(order)} classes")
        fig.tight_layout()
        save_fig(fig, Path(path))
        plt.close(fig)
        return
    rows = []
    for c in order:
        xc = x[labels == c][:per_class]
        if len(xc) < per_class:  # pad a short row with mid-grey
            xc = np.concatenate([xc, np.zeros((per_class - len(xc),) + xc.shape[1:], xc.dtype)])
        rows.append(xc)
    save_grid(
        path,
        np.concatenate(rows)[: 100 * per_class] if rows else x,
        nrow=per_class,
        scale=scale,
        limit=len(rows) * per_class,
    )


def sample_run(
    out,
    *,
    run=None,
    checkpoint=None,
    sampler="ddim",
    steps=None,
    eta=0.0,
    num_samples=500,
    seed=0,
    device="auto",
    batch_size=500,
    progress=True,
    ema=True,
    clip_x0="auto",
    trust_unverified: bool = False,
    dtype=None,
    sigmas: str = "exponential",
    classes=None,
    guidance=None,
    guidance_rescale: float = 0.0,
) -> dict:
    """Load, sample, and write ``out``/samples.npz (``samples`` float32 + ``info`` JSON) and
    ``out``/samples.png. ``dtype``: the U-Net's precision (``generate``).
    Returns the info dict.

    ``classes`` (a conditional run; ``parse_classes``: 4, "0-9", "1,3,5", "all", ...): the
    samples split equally over the classes asked (``class_labels``), guided with scale
    ``guidance`` (default ``DEFAULT_GUIDANCE``) and rescale ``guidance_rescale``; samples.npz
    then also holds ``labels`` (int64 (N,), the class asked for each sample) and samples.png
    shows one row per class. Without ``classes`` a conditional run samples its unconditional
    model (the null label).

    The checkpoint and the arguments are checked first; then ``out`` is locked for the rest of
    the call (``rundir.claim_output``: a samples.npz/png there that diffmath did not write is
    never replaced); samples that are not finite are an error and nothing is written."""
    import os

    from .distributed import Dist, resolve_device

    check_net_dtype(dtype)
    dev = resolve_device(device)
    dd = Dist(dev)  # under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA
    try:
        if dd.active and dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dd.rank)) % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        return _sample_run(
            out,
            dd,
            run=run,
            checkpoint=checkpoint,
            sampler=sampler,
            steps=steps,
            eta=eta,
            num_samples=num_samples,
            seed=seed,
            device=str(dev),
            batch_size=batch_size,
            progress=progress and dd.rank == 0,
            ema=ema,
            clip_x0=clip_x0,
            trust_unverified=trust_unverified,
            dtype=dtype,
            sigmas=sigmas,
            classes=classes,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
        )
    finally:
        dd.close()


def request_labels(lm: LoadedModel, classes, num_samples: int):
    """The labels (N,) for a ``--class`` request (``parse_classes``, ``class_labels``), or None
    without one; ``ValueError`` for ``classes`` on an unconditional run."""
    if classes is None:
        return None
    if lm.num_classes == 0:
        raise unconditional_error(lm, "--class")
    return class_labels(parse_classes(classes, lm.num_classes, lm.config.class_names), num_samples)


def conditioning_info(lm: LoadedModel, labels, guidance, guidance_rescale) -> dict:
    """What a conditional run's samples were asked for (samples.npz ``info``); {} for an
    unconditional run."""
    if lm.num_classes == 0:
        return {}
    names = list(lm.config.class_names)
    if labels is None:
        return {"conditioning": "null (the unconditional model)", "num_classes": lm.num_classes, "class_names": names}
    order = list(dict.fromkeys(int(c) for c in labels))
    return {
        "conditioning": "class",
        "classes": order,
        "num_classes": lm.num_classes,
        "class_names": names,
        "per_class": int(np.sum(np.asarray(labels) == order[0])),
        "guidance": guidance,
        "guidance_rescale": guidance_rescale,
        "learned_variance": "the conditional half's" if lm.config.learn_sigma else None,
    }


def sampling_info(lm, sampler: str, steps, eta, num_samples: int, seed, ema: bool, clip_x0=None) -> dict:
    """The record of a sampling call stored beside the samples (samples.npz ``info``)."""
    return {
        "sampler": sampler,
        "steps": steps
        if steps is not None
        else (DEFAULT_STEPS[sampler] or (lm.schedule.num_timesteps if sampler == "ddpm" else None)),
        "eta": eta if sampler == "ddim" else None,
        "num_samples": int(num_samples),
        "seed": seed,
        "checkpoint": str(lm.checkpoint),
        "step": lm.step,
        "weights": "ema" if ema else "raw",
        "clip_x0": clip_x0,
    }


SAMPLE_FILES = ("samples.npz", "samples.png")


def claim_samples_folder(out, dd=None, command: str = "sample"):
    """Lock ``out`` to write samples.npz/png into it (rank 0 under torchrun; the other ranks get
    rank 0's refusal too, so none of them waits for the others forever). Returns the lock or None."""
    from .checkpoint import RunError, legacy_run_files
    from .rundir import claim_output

    lock, err = None, None
    if dd is None or dd.rank == 0:
        try:
            lock = claim_output(out, command, SAMPLE_FILES, adopt=legacy_run_files)
        except (RunError, OSError) as e:
            err = str(e)
    if dd is not None:
        err = dd.broadcast_object(err)
    if err:
        raise RunError(err)
    return lock


def _sample_run(
    out,
    dd,
    *,
    run,
    checkpoint,
    sampler,
    steps,
    eta,
    num_samples,
    seed,
    device,
    batch_size,
    progress,
    ema,
    clip_x0,
    trust_unverified=False,
    dtype=None,
    sigmas="exponential",
    classes=None,
    guidance=None,
    guidance_rescale=0.0,
):
    import time

    lm = load_model(run=run, checkpoint=checkpoint, device=device, ema=ema, trust_unverified=trust_unverified)
    check_sampling(lm, num_samples, sampler, steps, eta, seed, batch_size, sigmas)
    labels = request_labels(lm, classes, num_samples)
    labels, guidance, guidance_rescale = check_conditioning(lm, labels, guidance, guidance_rescale, num_samples)
    lock = claim_samples_folder(out, dd)
    try:
        t0 = time.time()
        if clip_x0 == "auto":
            clip_x0 = default_clip(lm)
        x = generate(
            lm,
            num_samples,
            sampler=sampler,
            steps=steps,
            eta=eta,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            clip_x0=clip_x0,
            dtype=dtype,
            sigmas=sigmas,
            labels=labels,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
        )
        secs = time.time() - t0
        info = sampling_info(
            lm, sampler, steps, eta, num_samples, seed, ema, clip_x0=clip_x0 if sampler in ("ddpm", "ddim") else None
        )
        if dtype is not None:
            info["dtype"] = dtype
        if sampler in SOLVER_SAMPLERS:
            info["sigmas"] = sigmas
            info["nfe"] = 2 * info["steps"] - 1 if sampler in ("heun", "edm") else info["steps"]
        info.update(conditioning_info(lm, labels, guidance, guidance_rescale))
        info.update(seconds=round(secs, 3), world_size=dd.world)
        if dd.rank == 0:
            out = Path(out)
            extra = {} if labels is None else {"labels": labels}
            atomic_write_npz(out / "samples.npz", samples=x, info=np.str_(json.dumps(info)), **extra)
            if labels is None:
                save_grid(out / "samples.png", x, title=f"{sampler}, {num_samples} samples")
            else:
                save_class_grid(
                    out / "samples.png",
                    x,
                    labels,
                    names=lm.config.class_names,
                    title=f"{sampler}, guidance {guidance:g}",
                )
        return info
    finally:
        if lock is not None:
            lock.release()
