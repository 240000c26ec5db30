"""Sampling from a trained run: ``generate`` draws the samples of a ``LoadedModel``
(``diffmath.pipeline.loaded``) with any of the samplers (``SAMPLERS``; their loops in
``diffmath.pipeline.sampler_loops``), its request checked at the door (``check_sampling``,
``check_conditioning``, ``check_net_dtype``) and its samples refused if not finite
(``check_finite_samples``). ``diffmath sample`` writes them to a folder
(``diffmath.pipeline.sample_run``).

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

Noise: the start x_T and the kernel noise are keyed by (seed, global sample index), so the
samples do not depend on the chunking (``batch_size``) or on the number of processes; the
pc/ode samplers draw from a ``torch.Generator`` per chunk (those depend on the chunking).
Under ``torchrun`` each rank samples a contiguous share and rank 0 gathers and writes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .loaded import NET_DTYPES, LoadedModel
from .sampler_loops import SOLVER_SAMPLERS, loop_ddim, loop_ddpm, loop_em, loop_solver, matched_vpsde, sde_score

__all__ = [
    "generate",
    "check_sampling",
    "check_net_dtype",
    "default_clip",
    "parse_classes",
    "class_labels",
    "request_labels",
    "check_conditioning",
    "unconditional_error",
    "check_finite_samples",
    "SAMPLERS",
    "DEFAULT_STEPS",
    "LADDERS",
    "DEFAULT_GUIDANCE",
]

#: ``--sampler``: the discrete and SDE samplers, then the sigma-space solvers (``SOLVER_SAMPLERS``)
SAMPLERS = ("ddpm", "ddim", "em", "pc", "ode") + tuple(SOLVER_SAMPLERS)
#: the steps of each sampler when ``steps`` is None (ddpm: T; ode: adaptive)
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "em": 500, "pc": 500, "ode": None} | {name: 20 for name in SOLVER_SAMPLERS}
LADDERS = ("karras", "exponential", "schedule")  # --sigmas
#: the default ladder: the lowest exact KL on linear and cosine schedules (docs/samplers.md)
DEFAULT_LADDER = "exponential"
# The guidance scale s of ``sample --class`` when --guidance is not given (diffusers' convention:
# 1 = the plain conditional model). Chosen on the demo's digits (README, docs/guidance.md).
DEFAULT_GUIDANCE = 1.5


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
    sigmas: str = DEFAULT_LADDER,
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
            x = loop_ddim(lm, x, kseed, a, num_samples, steps, eta, progress, clip_x0)
        elif sampler == "ddpm":
            x = loop_ddpm(lm, x, kseed, a, num_samples, steps, progress, clip_x0)
        elif sampler == "em":
            x = loop_em(lm, x, kseed, a, num_samples, steps, progress)
        elif sampler in SOLVER_SAMPLERS:
            g = torch.Generator(device=lm.device).manual_seed(derive_seed(seed, "chunk", a))
            x = loop_solver(lm, x, sampler, steps, sigmas, g, progress, clip_x0)
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


def check_sampling(lm: LoadedModel, num_samples, sampler, steps, eta, seed=0, batch_size=1, sigmas=DEFAULT_LADDER):
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


def request_labels(lm: LoadedModel, classes, num_samples: int):
    """The labels (N,) for a ``--class`` request (``parse_classes``, ``class_labels``), or None
    without one; ``ValueError`` for ``classes`` on an unconditional run."""
    if classes is None:
        return None
    if lm.num_classes == 0:
        raise unconditional_error(lm, "--class")
    return class_labels(parse_classes(classes, lm.num_classes, lm.config.class_names), num_samples)


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
