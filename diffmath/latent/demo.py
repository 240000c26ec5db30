"""The latent diffusion demo (``demo_latent``, ``diffmath demo --latent``): a VAE and a latent
U-Net on the 8x8 digits, sampled, evaluated and written up in report.md. ``diffmath.latent``
gives the overview.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..pipeline.io import atomic_write_json, atomic_write_text
from .diffusion import LATENT_DEMO_CONFIG, LatentResult, evaluate_latent, sample_latent, train_latent
from .run import latent_run_files, read_latent_run
from .vae_config import VAE_DEMO_CONFIG, VAEConfig

__all__ = ["demo_latent"]


def demo_latent(
    out=Path("runs/demo-latent"),
    *,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    config_overrides: dict | None = None,
    vae_overrides: dict | None = None,
    num_samples: int = 500,
    sampler: str = "ddim",
    steps: int = 50,
) -> dict:
    """The latent counterpart of ``diffmath demo``: train the VAE and the latent U-Net on the
    8x8 digits (or reuse a finished demo run in ``out``), sample with DDIM, evaluate the decoded
    samples with the pixel pipeline's metrics, and write ``out``/report.md. Returns the metrics
    (with ``timings`` and ``vae``)."""
    from ..pipeline.checkpoint import check_compatible, read_run_config
    from ..pipeline.config import TrainConfig
    from ..pipeline.rundir import RunError

    out = Path(out)
    config = TrainConfig(**{**LATENT_DEMO_CONFIG, "device": device, "progress": progress, **(config_overrides or {})})
    vc = VAEConfig(**{**VAE_DEMO_CONFIG, "device": device, "progress": progress, **(vae_overrides or {})})
    from ..pipeline.distributed import resolve_device
    from ..pipeline.rundir import is_empty, open_run

    resolve_device(device)  # every argument is checked before --out is touched
    resume = False
    if out.is_dir() and not is_empty(out) and not overwrite:
        try:
            read_latent_run(out)
            check_compatible(read_run_config(out / "unet")["config"], config, where=str(out / "unet" / "config.json"))
            resume = True
        except (RunError, ValueError) as e:
            raise RunError(
                f"--out {str(out)!r} holds something other than this latent demo run ({e}); pass "
                "--overwrite or another --out"
            ) from None
    # one lock over training, sampling, evaluation and the report
    with open_run(out, "demo --latent", resume=resume, overwrite=overwrite, adopt=latent_run_files):
        return _demo_latent(out, config, vc, resume, overwrite, device, progress, num_samples, sampler, steps)


def _demo_latent(out, config, vc, resume, overwrite, device, progress, num_samples, sampler, steps) -> dict:
    t0 = time.time()
    res = train_latent(out, config, vae_config=vc, resume=resume, overwrite=overwrite)
    if res.unet.interrupted:
        raise KeyboardInterrupt
    t1 = time.time()
    x, info = sample_latent(
        out, out, sampler=sampler, steps=steps, num_samples=num_samples, device=device, progress=progress
    )
    t2 = time.time()
    metrics = evaluate_latent(out, device=device, progress=progress)
    t3 = time.time()
    metrics["timings"] = {
        **res.timings,
        "train_s": round(t1 - t0, 1),
        "sample_s": round(t2 - t1, 1),
        "evaluate_s": round(t3 - t2, 1),
        "total_s": round(t3 - t0, 1),
    }
    metrics["vae"] = res.vae_metrics
    metrics["latent"] = {"shape": list(res.latent_shape), "scale_factor": res.scale}
    atomic_write_json(out / "metrics.json", metrics)
    _write_latent_report(out, metrics, config, info, res)
    return metrics


def _write_latent_report(out: Path, m: dict, config, info: dict, res: LatentResult) -> Path:
    from ..pipeline.report import metrics_table

    v = m.get("vae", {})
    L = ["# diffmath latent diffusion demo", ""]
    L.append(
        f"VAE: 8x8 digits -> latents of shape {tuple(res.latent_shape)}, scaling factor {res.scale:.4f} "
        f"(1/std of the training latents). Held-out ELBO {v.get('held_out_elbo_bpd', float('nan')):.3f} "
        f"± {v.get('held_out_elbo_bpd_stderr') or 0:.3f} bits/dim (17-level discretised decoder)."
    )
    L.append("")
    L.append(
        f"Latent U-Net: channel_mult {tuple(config.channel_mult)}, {config.steps} steps of batch {config.batch_size}, "
        f"{config.schedule} schedule, T = {config.timesteps}. Sampler {info['sampler']} with {info['steps']} steps, "
        f"{info['num_samples']} samples."
    )
    L.append("")
    L += metrics_table(m)
    L.append("")
    L.append("Samples: ![samples](samples.png)  VAE reconstructions: ![recon](vae/recon.png)")
    L.append("")
    L.append(f"Timings (s): {m.get('timings')}")
    p = out / "report.md"
    atomic_write_text(p, L)
    return p
