"""The record of a latent diffusion run: its folder's ``latent.json`` (``write_latent_run``,
``read_latent_run``, which checks every key a run is used by) and the paths inside the folder.
``diffmath.latent`` gives the overview.

A latent run directory holds::

    latent.json            format, VAE checkpoint and hash, latent shape, scaling factor
    vae/                   vae.safetensors + vae.json (when the VAE was trained by this run), recon.png
    latents.safetensors    the cached latents (unscaled) + scale factor + hashes
    unet/                  the diffusion run (config.json, step-NNNNNN.safetensors/.json, loss.png)
    samples.npz/.png       decoded samples (``sample_latent``), metrics.json, report.md (``demo_latent``)
"""

from __future__ import annotations

import math
from pathlib import Path

from ..pipeline.io import atomic_write_json, read_json
from .cache import LatentCache
from .vae_checkpoint import LoadedVAE

__all__ = ["LATENT_RUN_FORMAT", "read_latent_run", "write_latent_run"]

LATENT_RUN_FORMAT = "diffmath.latent-run/1"


_LATENT_RUN_KEYS = {  # key: (what it must be, test)
    "vae_checkpoint": ("a path (string)", lambda v: isinstance(v, str) and bool(v)),
    "vae_hash": ("a SHA-256 hex digest", lambda v: isinstance(v, str) and len(v) == 64),
    "latent_shape": (
        "a list of 3 positive integers",
        lambda v: isinstance(v, list) and len(v) == 3 and all(type(n) is int and n >= 1 for n in v),
    ),
    "scale_factor": ("a positive finite number", lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0),
}


def read_latent_run(out) -> dict:
    """latent.json of a latent run directory (``RunError`` if absent, not ours, or lacking one of
    the keys a run is used by, or holding it with the wrong type: the message names the key)."""
    from ..pipeline.rundir import RunError

    p = Path(out) / "latent.json"
    if not p.exists():
        raise RunError(f"{str(out)!r} is not a latent diffusion run: it has no latent.json")
    d = read_json(p, LATENT_RUN_FORMAT, "latent run", RunError)
    for k, (what, ok) in _LATENT_RUN_KEYS.items():
        if k not in d:
            raise RunError(f"{str(p)!r} lacks the key {k!r} ({what}); the latent run cannot be used")
        if not ok(d[k]):
            raise RunError(f"{str(p)!r}: the key {k!r} must be {what}; got {d[k]!r:.100}")
    for k in ("unet_run", "encode_mode"):
        if k in d and not (isinstance(d[k], str) and d[k]):
            raise RunError(f"{str(p)!r}: the key {k!r} must be a non-empty string; got {d[k]!r:.100}")
    if "/" in d.get("unet_run", "unet") or d.get("unet_run") in ("..", "."):
        raise RunError(f"{str(p)!r}: the key 'unet_run' must name a folder inside the run; got {d['unet_run']!r}")
    return d


def write_latent_run(
    out,
    lv: LoadedVAE,
    cache: LatentCache,
    *,
    encode_mode: str,
    data_spec: str,
    image_size: int,
    bins: int | None,
    vae_metrics: dict,
) -> Path:
    """Write ``out``/latent.json, the record of a latent run: format, the VAE checkpoint (relative
    to ``out`` when inside it) and its hash, latent and image shapes, the scaling factor, the
    cache and U-Net locations (``latents.safetensors``, ``unet``), ``encode_mode``, the image data
    (``data_spec``, ``image_size``, ``bins``) and the VAE's metrics. Returns the path."""
    out = Path(out)
    atomic_write_json(
        out / "latent.json",
        {
            "format": LATENT_RUN_FORMAT,
            "vae_checkpoint": _rel(out, lv.path),
            "vae_hash": lv.hash,
            "latent_shape": list(cache.latent_shape),
            "image_shape": list(lv.image_shape),
            "scale_factor": cache.scale,
            "latent_cache": "latents.safetensors",
            "encode_mode": encode_mode,
            "unet_run": "unet",
            "data": {"spec": data_spec, "image_size": image_size, "bins": bins},
            "vae_metrics": vae_metrics,
        },
    )
    return out / "latent.json"


def run_path(out: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else out / q


def _rel(out: Path, p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(Path(p).resolve())


_LATENT_FILES = (
    "latent.json",
    "latents.safetensors",
    "latents.json",
    "samples.npz",
    "samples.png",
    "metrics.json",
    "report.md",
)


def latent_run_files(out) -> list[str] | None:
    """For a latent run written before folders got a marker: the names of its files and its
    sub-runs "unet/" and "vae/" (None if ``out`` holds no readable latent.json); ``rundir``
    lists them in the marker it adds."""
    try:
        read_latent_run(out)
    except ValueError:
        return None
    out = Path(out)
    subs = [f"{n}/" for n, m in (("unet", "config.json"), ("vae", "vae.json")) if (out / n / m).is_file()]
    return sorted(n for n in _LATENT_FILES if (out / n).is_file()) + subs
