"""``diffmath sample``: ``sample_run`` loads a run's model (``diffmath.pipeline.loaded``), checks
the request (``diffmath.pipeline.generate``), locks the output folder (``claim_samples_folder``)
and writes the samples of ``generate`` to samples.npz, with their record (``sampling_info``,
``conditioning_info``), and to samples.png (``save_grid``, ``save_class_grid``). Under
``torchrun`` each rank samples a contiguous share and rank 0 gathers and writes.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .generate import (
    DEFAULT_LADDER,
    DEFAULT_STEPS,
    check_conditioning,
    check_net_dtype,
    check_sampling,
    default_clip,
    generate,
    request_labels,
)
from .io import atomic_write_bytes, atomic_write_npz
from .loaded import LoadedModel, load_model
from .plots import save_fig
from .sampler_loops import SOLVER_SAMPLERS

__all__ = [
    "sample_run",
    "save_grid",
    "save_class_grid",
    "claim_samples_folder",
    "sampling_info",
    "conditioning_info",
    "SAMPLE_FILES",
]


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
    sigmas: str = DEFAULT_LADDER,
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
    sigmas=DEFAULT_LADDER,
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
