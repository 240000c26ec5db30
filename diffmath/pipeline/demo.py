"""The end-to-end demo on the embedded 8x8 digits (``diffmath demo``): train the class-conditional
demo model (``config.DEMO_CONFIG`` + ``DEMO_CLASSES``), sample its unconditional model with DDIM,
evaluate it, sweep the guidance scale per digit and write report.md (README, docs/guidance.md).

Imports nothing heavy at module level, so that ``diffmath --help`` stays fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["run_demo", "DEMO_OUT"]

DEMO_SAMPLES = 500
DEMO_SAMPLER = dict(sampler="ddim", steps=50, eta=0.0)
DEMO_VLB_IMAGES = 64
# The demo's guidance table: samples per digit at each scale s (the default s and s = 1, which
# the README's targets are stated at, get 100; the others 30, one per-class FD set)
DEMO_GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
DEMO_PER_CLASS = 100
DEMO_PER_CLASS_OTHER = 30
DEMO_OUT = Path("runs/demo")


def run_demo(
    out=DEMO_OUT,
    *,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    config_overrides: dict | None = None,
    num_samples: int = DEMO_SAMPLES,
    vlb_images: int = DEMO_VLB_IMAGES,
    guidance_scales=DEMO_GUIDANCE_SCALES,
    per_class: int = DEMO_PER_CLASS,
    per_class_other: int = DEMO_PER_CLASS_OTHER,
) -> dict:
    """Train the class-conditional demo model (``DEMO_CONFIG`` + ``DEMO_CLASSES``; or reuse a
    finished demo training in ``out``); sample its unconditional model (the null label) with
    DDIM and evaluate those samples; sample every digit at each guidance scale in
    ``guidance_scales`` (``per_class`` per digit at s = 1 and at the default s, ``per_class_other``
    at the others) and score them per class (``evaluate.guidance_sweep``); write report.md with
    the 10-row grid (classes.png) and the guidance plot (guidance.png). Returns the metrics,
    the sweep under ``"guidance"`` and the timings under ``"timings"``. ``config_overrides``
    with ``conditional = False`` gives the unconditional demo (no sweep)."""
    from .checkpoint import RunError, check_compatible, legacy_run_files, read_run_config
    from .config import DEMO_CLASSES, DEMO_CONFIG, TrainConfig
    from .distributed import resolve_device
    from .rundir import is_empty, open_run

    out = Path(out)
    over = dict(config_overrides or {})
    classes = {} if over.get("conditional", True) is False else DEMO_CLASSES
    config = TrainConfig(**{**DEMO_CONFIG, **classes, "device": device, "progress": progress, **over})
    resolve_device(device)  # every argument is checked before --out is touched
    resume = False
    if out.is_dir() and not is_empty(out) and not overwrite:
        try:
            check_compatible(read_run_config(out)["config"], config, where=str(out / "config.json"))
            resume = True
        except RunError as e:
            raise RunError(
                f"--out {str(out)!r} holds something other than this demo run ({e}); pass --overwrite or another --out"
            ) from None
    # one lock over training, sampling, evaluation and the report
    sweep = dict(scales=tuple(float(v) for v in guidance_scales), per_class=per_class, per_class_other=per_class_other)
    with open_run(out, "demo", resume=resume, overwrite=overwrite, adopt=legacy_run_files):
        return _demo(out, config, resume, overwrite, device, progress, num_samples, vlb_images, sweep)


def _demo_guidance(out, device, progress, scales, per_class, per_class_other) -> dict:
    """The demo's conditional half: every digit at each guidance scale, the per-class metrics
    (``evaluate.guidance_sweep``), classes.npz/png at the default scale, guidance.png."""
    import json

    import numpy as np

    from .data import load_data
    from .evaluate import guidance_sweep
    from .generate import DEFAULT_GUIDANCE
    from .io import atomic_write_npz
    from .loaded import load_model
    from .plots import plot_guidance
    from .sample_run import save_class_grid

    lm = load_model(run=out, device=device)
    data = load_data(lm.config.data, lm.config.image_size)
    scales = sorted(set(scales) | {DEFAULT_GUIDANCE})
    counts = {s: per_class if s in (1.0, DEFAULT_GUIDANCE) else per_class_other for s in scales}
    rows, (x, y) = guidance_sweep(
        lm,
        data,
        scales,
        per_class=counts,
        keep=DEFAULT_GUIDANCE,
        progress=progress,
        **{k: v for k, v in DEMO_SAMPLER.items() if k != "eta"},
    )
    info = {
        "sampler": DEMO_SAMPLER["sampler"],
        "steps": DEMO_SAMPLER["steps"],
        "guidance": DEFAULT_GUIDANCE,
        "per_class": per_class,
        "seed": 0,
        "checkpoint": str(lm.checkpoint),
        "step": lm.step,
    }
    atomic_write_npz(out / "classes.npz", samples=x, labels=y, info=np.str_(json.dumps(info)))
    save_class_grid(out / "classes.png", x, y, names=lm.config.class_names)
    plot_guidance(out / "guidance.png", rows, title=f"{lm.config.data}: classifier-free guidance (DDIM 50)")
    return {"default": DEFAULT_GUIDANCE, "sampler": info, "scales": rows}


def _demo(out, config, resume, overwrite, device, progress, num_samples, vlb_images, sweep=None) -> dict:
    import torch

    from .distributed import resolve_device
    from .evaluate import evaluate_run
    from .io import atomic_write_json
    from .loop import train
    from .report import write_report
    from .sample_run import sample_run

    timings = {}
    t0, c0 = time.time(), time.process_time()
    load0 = _load_average()
    res = train(config, out, resume=resume, overwrite=overwrite)
    timings["train_s"] = round(time.time() - t0, 1)
    if res.interrupted:
        raise KeyboardInterrupt
    t1 = time.time()
    info = sample_run(out, run=out, num_samples=num_samples, seed=0, device=device, progress=progress, **DEMO_SAMPLER)
    timings["sample_s"] = round(time.time() - t1, 1)
    t2 = time.time()
    metrics = evaluate_run(out, vlb_images=vlb_images, device=device, progress=progress)
    timings["evaluate_s"] = round(time.time() - t2, 1)
    if config.conditional and sweep is not None:
        t3 = time.time()
        metrics["guidance"] = _demo_guidance(out, device, progress, **sweep)
        timings["guidance_s"] = round(time.time() - t3, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    timings["cpu_s"] = round(time.process_time() - c0, 1)  # this process's CPU time: the wall time on idle cores
    if load0 is not None:
        timings["load_avg_1min"] = [load0, _load_average()]
    timings["device"] = str(resolve_device(device))
    timings["threads"] = torch.get_num_threads()
    metrics["timings"] = timings
    atomic_write_json(out / "metrics.json", metrics)
    write_report(out, metrics, config, info, timings, trained_steps=res.trained_steps)
    return metrics


def _load_average():
    """The 1-minute load average (None where the platform has none): the demo's timings depend on it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None
