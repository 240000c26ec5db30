"""Pixel-space vs latent-space diffusion on the 8x8 digits at an equal wall-clock training budget
(``compare_pixel_latent``, ``diffmath compare-latent``; the table in docs/latent.md).
``diffmath.latent`` gives the overview.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..pipeline.data import Data, load_data
from ..pipeline.io import atomic_write_json, atomic_write_npz, atomic_write_text, forget_file
from .cache import decode_latents, encode_dataset
from .diffusion import LATENT_DEMO_CONFIG, check_unet_fits, evaluate_latent, sample_latent, write_latent_run
from .vae_config import VAE_DEMO_CONFIG, VAEConfig
from .vae_train import train_vae

__all__ = ["compare_pixel_latent", "comparison_table"]


def _train_for_budget(config, out: Path, data: Data, budget_s: float, *, chunk_s: float = 30.0) -> dict:
    """Train ``config`` on ``data`` in ``out`` for ``budget_s`` seconds of wall clock (all of
    ``train``'s own time counted: start-up, steps, checkpoints), in chunks of about ``chunk_s``
    joined by ``resume`` (bit-identical to one uninterrupted run; ``config.steps`` is only an
    upper bound, so the learning rate must not depend on it). Returns steps and seconds."""
    from ..pipeline.checkpoint import list_checkpoints
    from ..pipeline.loop import train

    spent, steps, sec_per_step, first = 0.0, 0, None, True
    while spent < budget_s and steps < config.steps:
        left = budget_s - spent
        n = 10 if sec_per_step is None else max(1, int(min(chunk_s, left) / sec_per_step))
        t = time.perf_counter()
        res = train(config, out, resume=not first, data=data, stop_after=n)
        spent += time.perf_counter() - t
        first = False
        steps = res.step
        sec_per_step = spent / steps
        for _, p in list_checkpoints(out)[:-1]:  # keep the latest only
            forget_file(p)
            forget_file(p.with_suffix(".safetensors"))
    return {"steps": steps, "train_s": round(spent, 2), "s_per_step": spent / max(1, steps)}


def compare_pixel_latent(
    out,
    *,
    budget_s: float = 120.0,
    vae_config: VAEConfig | None = None,
    pixel_config=None,
    latent_config=None,
    num_samples: int = 500,
    sampler: str = "ddim",
    steps: int = 50,
    device: str = "cpu",
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Pixel-space vs latent-space diffusion on the 8x8 digits at an equal wall-clock training
    budget for the diffusion model (``budget_s`` each; the VAE's training, a one-off cost that
    latent models amortise, is timed and reported separately). Both U-Nets use the pixel demo's
    recipe (``train.DEMO_CONFIG``) with a constant learning rate after warm-up (the number of steps
    is not known in advance); the latent one does not down-sample (``LATENT_DEMO_CONFIG``).

    Measured: wall-clock per training step, steps done, sampling time for ``num_samples``
    (``sampler``/``steps``; the latent time includes decoding) and the pixel pipeline's metrics
    (``evaluate.evaluate_run``: classifier confidence, classes present, class entropy, Fréchet
    distance) of the samples, beside the same metrics for the VAE's reconstructions of the
    held-out digits (the best a latent model can do with this VAE) and the real held-out floor.

    Writes ``out``/comparison.json and ``out``/comparison.md (``comparison_table``); returns the dict.
    ``out`` is opened as a run folder (``diffmath.rundir.open_run``: refused if not empty unless
    ``overwrite``, which deletes only what diffmath wrote there) and locked until this returns.
    """
    from ..pipeline.rundir import open_run

    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not 0 < budget_s < float("inf"):
        raise ValueError(f"budget_s must be a positive finite number of seconds; got {budget_s!r}")
    with open_run(Path(out), "compare-latent", overwrite=overwrite):
        return _compare(
            Path(out), budget_s, vae_config, pixel_config, latent_config, num_samples, sampler, steps, device, progress
        )


def _compare(
    out, budget_s, vae_config, pixel_config, latent_config, num_samples, sampler, steps, device, progress
) -> dict:
    import platform

    from ..pipeline.config import TrainConfig
    from ..pipeline.rundir import open_run
    from ..pipeline.sample_run import sample_run

    big = 10**7
    common = dict(steps=big, lr_decay_steps=0, save_every=big, device=device, progress=False)
    pcfg = dataclasses.replace(pixel_config or TrainConfig(**_pixel_demo_config()), **common)
    lcfg = dataclasses.replace(latent_config or TrainConfig(**LATENT_DEMO_CONFIG), **common)
    vc = vae_config or VAEConfig(**{**VAE_DEMO_CONFIG, "device": device, "progress": progress})
    data = load_data("digits", 8)
    result = {
        "budget_s": budget_s,
        "num_samples": num_samples,
        "sampler": sampler,
        "sampler_steps": steps,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }

    # pixel space
    t = _train_for_budget(pcfg, out / "pixel", data, budget_s)
    si = sample_run(
        out / "pixel",
        run=out / "pixel",
        sampler=sampler,
        steps=steps,
        num_samples=num_samples,
        device=device,
        progress=progress,
    )
    from ..pipeline.evaluate import evaluate_run

    mp = evaluate_run(out / "pixel", vlb_images=0, device=device, progress=progress)
    result["pixel"] = {
        **t,
        "sample_s": si["seconds"],
        "params": _params(out / "pixel"),
        "data_shape": list(data.shape),
        "channel_mult": list(pcfg.channel_mult),
        "metrics": _headline(mp),
    }

    # latent space: the VAE (one-off), the cache, then the same budget for the U-Net
    lat = out / "latent"
    with open_run(lat, "compare-latent"):
        t0 = time.perf_counter()
        vres = train_vae(dataclasses.replace(vc, data="digits", image_size=8), lat / "vae", data=data)
        vae_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = encode_dataset(vres.loaded, data, lat / "latents.safetensors", seed=lcfg.seed)
        enc_s = time.perf_counter() - t0
        check_unet_fits(lcfg, cache.latent_shape)
        write_latent_run(
            lat,
            vres.loaded,
            cache,
            encode_mode="mean",
            data_spec="digits",
            image_size=8,
            bins=data.bins,
            vae_metrics=vres.metrics,
        )
        t = _train_for_budget(lcfg, lat / "unet", cache.data(), budget_s)
        x, li = sample_latent(
            lat, lat, sampler=sampler, steps=steps, num_samples=num_samples, device=device, progress=progress
        )
        ml = evaluate_latent(lat, device=device, progress=progress)
    result["latent"] = {
        **t,
        "sample_s": li["seconds"],
        "sample_latent_s": li["seconds_latent"],
        "decode_s": li["seconds_decode"],
        "params": _params(lat / "unet"),
        "vae_params": sum(p.numel() for p in vres.loaded.vae.parameters()),
        "data_shape": list(cache.latent_shape),
        "channel_mult": list(lcfg.channel_mult),
        "scale_factor": cache.scale,
        "vae_train_s": round(vae_s, 2),
        "vae_steps": vc.steps,
        "encode_s": round(enc_s, 2),
        "vae": vres.metrics,
        "metrics": _headline(ml),
    }

    # the VAE's reconstructions of the held-out digits (an upper bound on latent sample quality)
    recon = decode_latents(vres.loaded, cache.held_out * cache.scale, cache.scale)
    mr = _evaluate_images(lat / "unet", recon, out / "recon", device, progress)
    result["vae_reconstructions"] = {"metrics": _headline(mr), "images": int(len(recon))}
    result["real_held_out"] = {
        "mean_confidence": mp["real_held_out"]["mean_confidence"],
        "classes_present": mp["real_held_out"]["classes_present"],
        "class_entropy_bits": mp["real_held_out"]["class_entropy_bits"],
        "frechet_distance": mp["frechet_distance"]["held_out_real (floor)"],
        "noise_frechet_distance": mp["frechet_distance"]["gaussian_noise (ceiling)"],
    }
    atomic_write_json(out / "comparison.json", result)
    atomic_write_text(out / "comparison.md", [comparison_table(result)])
    return result


def _pixel_demo_config() -> dict:
    """The pixel demo's recipe, ``diffmath.train.DEMO_CONFIG`` (a copy)."""
    from ..pipeline.config import DEMO_CONFIG

    return dict(DEMO_CONFIG)


def _params(run: Path) -> int | None:
    try:
        return int(json.loads((run / "config.json").read_text())["model"]["parameters"])
    except (OSError, KeyError, ValueError):
        return None


def _headline(m: dict) -> dict:
    h = {k: m.get(k) for k in ("mean_confidence", "classes_present", "class_entropy_bits", "class_histogram")}
    fd = m.get("frechet_distance")
    if isinstance(fd, dict):
        h["frechet_distance"] = fd["samples"]
        h["frechet_n"] = fd["n"]
    return h


def comparison_table(r: dict) -> str:
    """The markdown table of a ``compare_pixel_latent`` result."""
    p, lt, rc, real = r["pixel"], r["latent"], r["vae_reconstructions"], r["real_held_out"]

    def row(name, shape, params, steps, sps, samp, m):
        return (
            f"| {name} | {shape} | {params} | {steps} | {sps} | {samp} | {m['mean_confidence']:.3f} | "
            f"{m['classes_present']}/10 | {abs(m['class_entropy_bits']):.2f} | {m['frechet_distance']:.2f} |"
        )

    L = [
        f"Digits 8x8, diffusion training budget {r['budget_s']:.0f} s wall clock each on {r['device']} "
        f"({r['threads']} torch threads, {r['cpus']} CPUs visible); {r['num_samples']} samples with "
        f"{r['sampler']} ({r['sampler_steps']} steps); metrics from diffmath.evaluate.",
        "",
        "| model | diffused shape | U-Net params | steps in budget | s / step | sampling (s) | classifier confidence "
        "| classes | class entropy (bits) | Fréchet distance |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row(
            "pixel U-Net",
            "x".join(map(str, p["data_shape"])),
            f"{p['params']:,}",
            p["steps"],
            f"{p['s_per_step']:.3f}",
            f"{p['sample_s']:.1f}",
            p["metrics"],
        ),
        row(
            "latent U-Net + VAE decoder",
            "x".join(map(str, lt["data_shape"])),
            f"{lt['params']:,}",
            lt["steps"],
            f"{lt['s_per_step']:.3f}",
            f"{lt['sample_s']:.1f} (decode {lt['decode_s']:.2f})",
            lt["metrics"],
        ),
        row("VAE reconstructions (held-out)", "-", f"VAE {lt['vae_params']:,}", "-", "-", "-", rc["metrics"]),
        f"| real held-out digits | - | - | - | - | - | {real['mean_confidence']:.3f} | {real['classes_present']}/10 | "
        f"{real['class_entropy_bits']:.2f} | {real['frechet_distance']:.2f} (floor) |",
        "",
        f"The VAE (one-off, not in the budget): {lt['vae_steps']} steps in {lt['vae_train_s']:.0f} s, held-out ELBO "
        f"{lt['vae']['held_out_elbo_bpd']:.3f} ± {lt['vae']['held_out_elbo_bpd_stderr']:.3f} bits/dim; encoding the "
        f"data {lt['encode_s']:.1f} s; scaling factor {lt['scale_factor']:.4f}. Fréchet distance of Gaussian noise "
        f"(ceiling): {real['noise_frechet_distance']:.2f}.",
    ]
    return "\n".join(L)


def _evaluate_images(run_dir: Path, x: np.ndarray, where: Path, device: str, progress: bool) -> dict:
    """The pixel pipeline's sample metrics (``evaluate.evaluate_run`` with no test VLB) of the
    images ``x``, judged against the data of the run in ``run_dir``."""
    from ..pipeline.evaluate import evaluate_run
    from ..pipeline.sample_run import claim_samples_folder

    with claim_samples_folder(where, command="compare-latent"):
        atomic_write_npz(where / "samples.npz", samples=np.asarray(x, np.float32), info=np.str_("{}"))
        return evaluate_run(
            run_dir, samples=where / "samples.npz", out=where, vlb_images=0, device=device, progress=progress
        )
