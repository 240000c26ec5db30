"""Latent diffusion runs (Rombach et al. 2022): the pixel pipeline's diffusion, trained, sampled
and evaluated on a VAE's scaled latents. ``diffmath.latent`` gives the overview.

The latent diffusion model is the same U-Net, eps-prediction, schedule and training loop as
in pixel space (``diffmath.train.train`` with the latent set as its ``data``), configured to
down-sample less: the latents are small (8x8 digits -> 4x4x2 with the default VAE), so
``channel_mult=(1,)`` (no down-sampling) or ``(1, 2)`` (4 -> 2). The layout of a latent run
directory is in ``diffmath.latent.run``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..pipeline.config import DEMO_CONFIG
from ..pipeline.data import Data, load_data
from ..pipeline.generate import DEFAULT_LADDER
from ..pipeline.io import atomic_write_json, atomic_write_npz, read_json
from .cache import LatentCacheError, decode_latents, encode_dataset, load_latents
from .run import latent_run_files, read_latent_run, run_path, write_latent_run
from .vae_checkpoint import as_loaded, load_vae
from .vae_config import VAEConfig
from .vae_train import check_vae_fits, train_vae

__all__ = [
    "LatentResult",
    "LATENT_DEMO_CONFIG",
    "train_latent",
    "sample_latent",
    "evaluate_latent",
    "evaluate_guidance_latent",
    "check_unet_fits",
]

# The latent U-Net for 4x4 latents: no down-sampling (the pixel demo's U-Net halves 8x8 -> 4x4),
# attention at 4x4 (16 tokens). Otherwise the pixel demo's recipe.
LATENT_DEMO_CONFIG = {**DEMO_CONFIG, "channel_mult": (1,)}  # latents are 4x4: no downsampling


@dataclass
class LatentResult:
    out: Path
    vae_checkpoint: Path
    cache: Path
    unet: object  # diffmath.train.TrainResult
    scale: float
    latent_shape: tuple
    timings: dict = field(default_factory=dict)
    vae_metrics: dict = field(default_factory=dict)


def check_unet_fits(config, latent_shape, where: str = "the U-Net config") -> None:
    """``ValueError`` unless a U-Net built from ``config`` (a ``TrainConfig``) can denoise latents
    of ``latent_shape``: the side divisible by its down-sampling 2**(len(channel_mult) - 1), and
    a fixed variance (the learned-variance loss uses a discretised decoder for data in [-1, 1],
    which latents are not)."""
    c, h, w = (int(n) for n in latent_shape)
    f = 2 ** (len(config.channel_mult) - 1)
    if h != w or h % f:
        raise ValueError(
            f"{where} down-samples by {f} (channel_mult = {tuple(config.channel_mult)}) but the latents are {h}x{w} "
            f"(shape {tuple(latent_shape)}); use a channel_mult with fewer entries, e.g. (1,) or (1, 2)"
        )
    if config.learn_sigma:
        raise ValueError(
            "learn_sigma is not supported in latent space (its VLB term assumes data on a grid in [-1, 1])"
        )


def _unet_data_shape(run: Path):
    from ..pipeline.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint
    from ..pipeline.rundir import RunError

    ck = latest_checkpoint(run)
    if ck is None:
        return None
    return tuple(read_json(ck, CHECKPOINT_FORMAT, "checkpoint", RunError).get("data_shape", ()))


def train_latent(
    out,
    config=None,
    *,
    vae=None,
    vae_config: VAEConfig | None = None,
    data: Data | None = None,
    resume: bool = False,
    overwrite: bool = False,
    encode_mode: str = "mean",
    stop_after: int | None = None,
    progress: bool | None = None,
    trust_unverified: bool = False,
) -> LatentResult:
    """Latent diffusion in ``out`` (layout in the module docstring):

    1. the VAE: ``vae`` (a checkpoint path or ``LoadedVAE``) if given; with ``resume`` the run's
       own; else train one with ``vae_config`` (default ``VAEConfig()``; its data and image size
       are taken from ``config``) into ``out``/vae;
    2. the latents: ``encode_dataset`` into ``out``/latents.safetensors (reused when its VAE hash
       and data digest match; a cache that is damaged (its SHA-256 differs from latents.json) or
       unverifiable is encoded again with a warning, and on ``resume`` the new one must give the
       run's recorded scaling factor, else the run is refused; one of another VAE or other images
       is encoded again, or refused on ``resume``);
    3. the diffusion model: ``diffmath.train.train(config, out/unet, data=<scaled latents>)``,
       ``config`` a ``TrainConfig`` (default ``LATENT_DEMO_CONFIG``) whose ``data``/``image_size``
       name the *image* data (what the VAE encodes).

    ``resume`` continues the diffusion run (the VAE and latents must be those of the run);
    ``overwrite`` replaces a run that diffmath wrote in ``out`` (only the files its markers list;
    a VAE given from inside ``out``/vae stays). Every input (data, VAE, configs) is checked before
    ``out`` is touched, and ``out`` is locked until this returns. ``stop_after``: as in ``train``;
    ``trust_unverified``: as in ``train`` (the U-Net checkpoint on ``resume``).
    """
    from ..pipeline.config import TrainConfig
    from ..pipeline.loop import train
    from ..pipeline.model import check_model_config, resolve_classes
    from ..pipeline.rundir import RunError, open_run

    t0 = time.time()
    out = Path(out)
    vc = None
    if config is None:
        config = TrainConfig(**LATENT_DEMO_CONFIG)
    if progress is not None:
        config = dataclasses.replace(config, progress=progress)
    if resume and overwrite:
        raise RunError("resume and overwrite contradict each other; pick one")
    if config.learn_sigma:  # refused before anything is written or trained (check_unet_fits says it again)
        raise ValueError(
            "learn_sigma is not supported in latent space (its VLB term assumes data on a grid in [-1, 1])"
        )
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} exists and is a file, not a directory")
    # --- every input is checked before out is touched
    if data is None:
        data = load_data(config.data, config.image_size)
    resolve_classes(config, data)  # --conditional on data without (enough) classes: refused before the VAE trains
    run_info = read_latent_run(out) if resume else None
    keep = []
    if vae is not None:
        lv = as_loaded(vae, config.device)
        if lv.path is None:
            raise ValueError(
                "train_latent needs a saved VAE (a checkpoint path or load_vae(...)) so the run can refer to it"
            )
        if run_info is not None and lv.hash != run_info["vae_hash"]:
            raise LatentCacheError(
                f"the VAE given (hash {lv.hash[:16]}...) is not the one the run in {str(out)!r} was trained with "
                f"(hash {run_info['vae_hash'][:16]}...); a resumed run keeps its VAE"
            )
        keep = [Path(lv.path).resolve().parent]  # a VAE given from inside out/vae survives the overwrite
        latent_shape = lv.latent_shape
    elif run_info is not None:
        lv = load_vae(run_path(out, run_info["vae_checkpoint"]), config.device)
        if lv.hash != run_info["vae_hash"]:
            raise LatentCacheError(
                f"the VAE checkpoint of {str(out)!r} has changed since the run started (hash mismatch)"
            )
        latent_shape = lv.latent_shape
    else:
        lv = None
        vc = vae_config if vae_config is not None else VAEConfig()
        vc = dataclasses.replace(
            vc, data=config.data, image_size=config.image_size, device=config.device, progress=config.progress
        )
        check_vae_fits(vc, data.shape, where=f"the {data.name!r} images")
        latent_shape = (vc.latent_channels, data.shape[1] // vc.factor, data.shape[2] // vc.factor)
    if lv is not None:
        check_vae_fits(lv, data.shape, where=f"the {data.name!r} images")
    # the U-Net must take the latents: refused before the VAE is trained
    check_unet_fits(config, latent_shape)
    check_model_config(config, latent_shape, strict=not resume)
    lock = open_run(out, "train --latent", resume=resume, overwrite=overwrite, keep=keep, adopt=latent_run_files)
    try:
        return _train_latent(
            out, config, lv, vc, data, run_info, resume, overwrite, encode_mode, stop_after, trust_unverified, t0, train
        )
    finally:
        lock.release()


def _train_latent(
    out, config, lv, vc, data, run_info, resume, overwrite, encode_mode, stop_after, trust_unverified, t0, train
) -> LatentResult:
    import warnings

    timings = {}
    # 1. the VAE
    vae_metrics = {}
    if lv is None:
        res = train_vae(vc, out / "vae", data=data, overwrite=overwrite)
        lv = res.loaded
        timings["vae_train_s"] = round(res.seconds, 2)
        vae_metrics = res.metrics
    if not vae_metrics:
        vae_metrics = dict(lv.meta.get("metrics", {}))

    # 2. the latents
    cache_path = out / "latents.safetensors"
    t1 = time.time()
    cache, damaged = None, None
    if cache_path.exists():
        try:
            cache = load_latents(cache_path, vae=lv, data=data)
            if cache.meta.get("mode") != encode_mode:
                cache = None
        except LatentCacheError as e:
            if getattr(e, "damaged", False):
                damaged = e
                warnings.warn(f"{e}; encoding the data again", UserWarning, stacklevel=3)
            elif resume:
                raise
            cache = None
    if cache is None:
        if resume and damaged is None and (out / "unet").exists() and _unet_data_shape(out / "unet") is not None:
            raise LatentCacheError(
                f"{str(cache_path)!r} is missing or stale; the run in {str(out)!r} cannot be resumed"
            )
        cache = encode_dataset(lv, data, cache_path, mode=encode_mode, seed=config.seed)
        if resume and damaged is not None and cache.scale != run_info["scale_factor"]:
            raise LatentCacheError(
                f"{str(cache_path)!r} was damaged, and encoding the data again gives other latents (scaling factor "
                f"{cache.scale!r}, the run recorded {run_info['scale_factor']!r}), so the U-Net in "
                f"{str(out / 'unet')!r} "
                "cannot be resumed on them; start a new run"
            )
    timings["encode_s"] = round(time.time() - t1, 2)

    # 3. the diffusion model
    unet_dir = out / "unet"
    if resume:
        shape = _unet_data_shape(unet_dir)
        if shape is not None and tuple(shape) != tuple(cache.latent_shape):
            raise ValueError(
                f"the U-Net in {str(unet_dir)!r} was trained on latents of shape {shape}, but the VAE makes latents of "
                f"shape {cache.latent_shape}"
            )
    write_latent_run(
        out,
        lv,
        cache,
        encode_mode=encode_mode,
        data_spec=config.data,
        image_size=config.image_size,
        bins=data.bins,
        vae_metrics=vae_metrics,
    )
    t2 = time.time()
    ldata = cache.data()
    if config.conditional:  # the images' labels and classes (the cache was checked to hold these images, in order)
        ldata.labels_train, ldata.labels_held_out = data.labels_train, data.labels_held_out
        ldata.class_names, ldata.info = (
            data.class_names,
            {**ldata.info, **{k: v for k, v in (data.info or {}).items() if k == "no_labels"}},
        )
    res = train(
        config,
        unet_dir,
        resume=resume and unet_dir.exists(),
        overwrite=overwrite,
        data=ldata,
        stop_after=stop_after,
        trust_unverified=trust_unverified,
    )
    timings["unet_train_s"] = round(time.time() - t2, 2)
    timings["total_s"] = round(time.time() - t0, 2)
    return LatentResult(out, lv.path, cache_path, res, cache.scale, cache.latent_shape, timings, vae_metrics)


def sample_latent(
    run,
    out=None,
    *,
    vae=None,
    sampler: str = "ddim",
    steps=None,
    eta: float = 0.0,
    num_samples: int = 500,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 500,
    progress: bool = False,
    ema: bool = True,
    trust_unverified: bool = False,
    dtype=None,
    classes=None,
    guidance=None,
    guidance_rescale: float = 0.0,
    sigmas: str = DEFAULT_LADDER,
) -> tuple[np.ndarray, dict]:
    """Sample a latent run: draw scaled latents with ``diffmath.sample.generate`` (any sampler
    of the pixel pipeline) from the U-Net in ``run``/unet, divide by the scaling factor and decode
    with the run's VAE (``vae`` overrides it; it must make latents of the U-Net's shape and have
    the run's hash). Returns (images (N, C, H, W) float32 in [-1, 1], info); with ``out``, writes
    ``out``/samples.npz (``samples``, ``latents`` (scaled), ``info``) and ``out``/samples.png, with
    ``out`` locked from after the checks to the end (as ``sample.sample_run``). Non-finite latents
    are an error (``sample.generate``). ``trust_unverified``: as in ``sample.load_model``.
    ``dtype``: the U-Net's precision ("fp32", "bf16", "fp16"; ``diffmath.sample.generate``).
    ``classes``, ``guidance``, ``guidance_rescale``: a conditional latent U-Net (``train_latent``
    with ``conditional``), as in ``sample.sample_run``; samples.npz then holds ``labels`` too.
    ``sigmas``: the noise-level ladder of the sigma-space solvers (``sampler`` "dpmpp-2m", "euler",
    ...; ``sample.generate``), recorded in ``info`` with their NFE as ``sample.sample_run`` does."""
    from ..pipeline.generate import check_conditioning, check_net_dtype, check_sampling, request_labels
    from ..pipeline.loaded import load_model
    from ..pipeline.sample_run import claim_samples_folder

    check_net_dtype(dtype)
    run = Path(run)
    info_run = read_latent_run(run)
    lm = load_model(
        run=run / info_run.get("unet_run", "unet"), device=device, ema=ema, trust_unverified=trust_unverified
    )
    lv = (
        as_loaded(vae, lm.device) if vae is not None else load_vae(run_path(run, info_run["vae_checkpoint"]), lm.device)
    )
    if tuple(lm.data_shape) != tuple(lv.latent_shape):
        raise ValueError(
            f"the VAE makes latents of shape {tuple(lv.latent_shape)} but the U-Net of {str(run)!r} was trained on "
            f"latents of shape {tuple(lm.data_shape)}: this VAE cannot decode its samples"
        )
    if lv.hash != info_run["vae_hash"]:
        raise LatentCacheError(
            f"the VAE given (hash {lv.hash[:16]}...) is not the one whose latents the U-Net of {str(run)!r} was "
            "trained on "
            f"(hash {info_run['vae_hash'][:16]}...)"
        )
    scale = float(info_run["scale_factor"])
    check_sampling(lm, num_samples, sampler, steps, eta, seed, batch_size, sigmas)
    labels = request_labels(lm, classes, num_samples)
    cond = check_conditioning(lm, labels, guidance, guidance_rescale, num_samples)
    lock = claim_samples_folder(out) if out is not None else None
    try:
        return _sample_latent(
            lm, lv, scale, out, sampler, steps, eta, num_samples, seed, batch_size, progress, ema, dtype, cond, sigmas
        )
    finally:
        if lock is not None:
            lock.release()


def _sample_latent(
    lm,
    lv,
    scale,
    out,
    sampler,
    steps,
    eta,
    num_samples,
    seed,
    batch_size,
    progress,
    ema,
    dtype=None,
    cond=(None, None, 0.0),
    sigmas=DEFAULT_LADDER,
):
    from ..pipeline.generate import generate
    from ..pipeline.sample_run import conditioning_info, save_class_grid, save_grid
    from ..pipeline.sampler_loops import SOLVER_SAMPLERS

    labels, guidance, rescale = cond
    t0 = time.time()
    # latents are not in [-1, 1]: never clip the predicted x0 to the pixel range
    z = generate(
        lm,
        num_samples,
        sampler=sampler,
        steps=steps,
        eta=eta,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        clip_x0=None,
        dtype=dtype,
        sigmas=sigmas,
        labels=labels,
        guidance=guidance,
        guidance_rescale=rescale,
    )
    t1 = time.time()
    x = decode_latents(lv, z, scale, batch_size=batch_size)
    t2 = time.time()
    from ..pipeline.sample_run import sampling_info

    info = sampling_info(lm, sampler, steps, eta, num_samples, seed, ema, clip_x0=None)
    if dtype is not None:
        info["dtype"] = dtype
    if sampler in SOLVER_SAMPLERS:
        info["sigmas"] = sigmas
        info["nfe"] = 2 * info["steps"] - 1 if sampler in ("heun", "edm") else info["steps"]
    info.update(conditioning_info(lm, labels, guidance, rescale))
    info.update(
        {
            "latent": True,
            "latent_shape": list(lv.latent_shape),
            "scale_factor": scale,
            "vae_hash": lv.hash,
            "seconds_latent": round(t1 - t0, 3),
            "seconds_decode": round(t2 - t1, 3),
            "seconds": round(t2 - t0, 3),
        }
    )
    if out is not None:
        out = Path(out)
        extra = {} if labels is None else {"labels": labels}
        atomic_write_npz(
            out / "samples.npz", samples=x, latents=z.astype(np.float32), info=np.str_(json.dumps(info)), **extra
        )
        if labels is None:
            save_grid(out / "samples.png", x, title=f"latent {sampler}, {num_samples} samples")
        else:
            save_class_grid(out / "samples.png", x, labels, names=lm.config.class_names)
    return x, info


def evaluate_latent(run, samples=None, out=None, *, device: str = "auto", progress: bool = False) -> dict:
    """``diffmath evaluate`` for a latent run: the pixel pipeline's sample metrics
    (``evaluate.evaluate_run`` on ``run``/unet, whose config names the image data) of the
    decoded samples (default ``run``/samples.npz), with the VAE's metrics and the latent shape
    and scale added; no test VLB (the diffusion bound lives in latent space). Writes
    ``out``/metrics.json (default ``run``)."""
    from ..pipeline.evaluate import evaluate_run
    from ..pipeline.rundir import claim_output

    run = Path(run)
    info = read_latent_run(run)
    out = Path(out) if out is not None else run
    samples = Path(samples) if samples is not None else run / "samples.npz"
    with claim_output(out, "evaluate", ("metrics.json",), adopt=latent_run_files):
        return _evaluate_latent(run, info, samples, out, device, progress, evaluate_run)


def evaluate_guidance_latent(
    run, out=None, *, device: str = "auto", progress: bool = False, trust_unverified: bool = False, **kw
) -> dict:
    """``evaluate.evaluate_guidance`` for a conditional latent run: its U-Net samples the scaled
    latents of every class at each scale, its VAE decodes them, and the images are scored per
    class. Keywords: those of ``evaluate_guidance`` (scales, per_class, sampler, steps, seed)."""
    from ..pipeline.evaluate import evaluate_guidance
    from ..pipeline.loaded import load_model

    run = Path(run)
    info = read_latent_run(run)
    lm = load_model(run=run / info.get("unet_run", "unet"), device=device, trust_unverified=trust_unverified)
    lv = load_vae(run_path(run, info["vae_checkpoint"]), lm.device)
    scale = float(info["scale_factor"])
    return evaluate_guidance(
        run,
        out,
        device=device,
        progress=progress,
        loaded=lm,
        decode=lambda z: decode_latents(lv, z, scale),
        adopt=latent_run_files,
        **kw,
    )


def _evaluate_latent(run, info, samples, out, device, progress, evaluate_run) -> dict:
    m = evaluate_run(
        run / info.get("unet_run", "unet"), samples=samples, out=out, vlb_images=0, device=device, progress=progress
    )
    m["vae"] = info.get("vae_metrics", {})
    m["latent"] = {"shape": info["latent_shape"], "scale_factor": info["scale_factor"], "vae_hash": info["vae_hash"]}
    m["test_vlb"] = (
        "not reported for latent runs (the diffusion VLB is a bound in latent space; see vae.held_out_elbo_bpd)"
    )
    atomic_write_json(out / "metrics.json", m)
    return m
