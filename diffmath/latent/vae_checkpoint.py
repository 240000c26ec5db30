"""VAE checkpoints: ``vae.safetensors`` (weights ``vae.*``) + ``vae.json`` (format, model and
training config, ``vae_hash``, SHA-256 of the weights file); nothing is ever unpickled. A loaded
checkpoint is a ``LoadedVAE`` (the VAE in eval mode with its metadata). ``diffmath.latent`` gives
the overview.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..nn.vae import VAE
from ..pipeline.io import atomic_write_json, read_sidecar, safetensors_metadata, save_safetensors, weights_and_sidecar
from .vae_config import VAEConfig

__all__ = ["VAE_FORMAT", "LoadedVAE", "vae_hash", "save_vae", "load_vae", "as_loaded"]

VAE_FORMAT = "diffmath.vae/1"


def vae_hash(vae: VAE) -> str:
    """SHA-256 over the VAE's config (canonical JSON) and every tensor of its state dict (name,
    dtype, shape, bytes, in sorted order): equal hashes mean the same architecture and the
    bit-identical weights."""
    h = hashlib.sha256()
    h.update(json.dumps(vae.config(), sort_keys=True).encode())
    for k, v in sorted(vae.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedVAE:
    """A VAE with its checkpoint metadata: ``vae`` (eval mode), ``meta`` (vae.json), ``hash``
    (``vae_hash``), ``path`` (the .json), ``bins`` (the data's levels, or None)."""

    vae: VAE
    meta: dict
    hash: str
    path: Path | None
    bins: int | None

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.vae.latent_shape)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.vae.image_shape)


def save_vae(
    out, vae: VAE, *, config: VAEConfig | None = None, bins: int | None = None, extra: dict | None = None
) -> Path:
    """Write ``out``/vae.safetensors (weights ``vae.*``; metadata format + the JSON below) and
    ``out``/vae.json (format, model config, training config, ``vae_hash``, SHA-256 of the
    .safetensors file, latent shape, bins, ``extra``). Returns the .json path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae_cpu = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    meta = {
        "format": VAE_FORMAT,
        "model": vae.config(),
        "train": config.to_dict() if config is not None else None,
        "vae_hash": vae_hash(vae),
        "latent_shape": list(vae.latent_shape),
        "image_shape": list(vae.image_shape),
        "bins": bins,
        **(extra or {}),
    }
    digest = save_safetensors(out / "vae.safetensors", vae_cpu, VAE_FORMAT, meta)
    meta = {
        **meta,
        "weights": "vae.safetensors",
        "weights_sha256": digest,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(out / "vae.json", meta)
    return out / "vae.json"


def _vae_paths(path) -> tuple[Path, Path]:
    """(vae.safetensors, vae.json) of a VAE checkpoint given by its folder or either file."""
    p = Path(path)
    return weights_and_sidecar(p / "vae.json" if p.is_dir() else p)


def load_vae(path, device: str | torch.device = "cpu") -> LoadedVAE:
    """Read a VAE checkpoint (its folder, vae.json or vae.safetensors; safetensors only, never
    pickle), rebuild the VAE from the stored config and check its weights: the file's SHA-256
    against vae.json (which must hold it) and the recomputed ``vae_hash`` (config and every
    tensor) against the stored one, which must be present: without vae.json the metadata
    embedded in the .safetensors vouches for the weights through that hash. ``ValueError``
    naming the file if a check fails or the file is not a diffmath VAE."""
    from safetensors.torch import load_file

    st, js = _vae_paths(path)
    if not st.exists():
        raise FileNotFoundError(
            f"VAE checkpoint {str(st)!r} does not exist (give a folder with vae.json, or the .json/.safetensors)"
        )
    md = safetensors_metadata(st, VAE_FORMAT, "VAE checkpoint", ValueError)
    if js.exists():
        meta = read_sidecar(js, st, VAE_FORMAT, "VAE checkpoint", ValueError)
        where = str(js)
    else:
        try:
            meta = json.loads(md.get("meta", "{}"))
        except ValueError as e:
            raise ValueError(f"{str(st)!r}: its embedded metadata is not JSON: {e}") from e
        where = f"the metadata embedded in {str(st)}"
    if not isinstance(meta, dict) or not isinstance(meta.get("vae_hash"), str):
        raise ValueError(
            f"{where!r} lacks the key 'vae_hash' (the SHA-256 of the VAE's config and weights), so the "
            "weights cannot be verified"
        )
    try:
        vae = VAE(**meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where!r} holds no usable VAE config (key 'model'): {e!r}") from e
    tensors = load_file(str(st))
    try:
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    except RuntimeError as e:
        raise ValueError(f"the weights in {str(st)!r} do not fit the VAE its config describes: {e}") from e
    h = vae_hash(vae)
    if meta["vae_hash"] != h:
        raise ValueError(
            f"{str(st)!r}: the weights hash to {h[:16]}... but the checkpoint says {meta['vae_hash'][:16]}..."
        )
    vae.to(torch_device(device)).eval()
    return LoadedVAE(vae, meta, h, js if js.exists() else st, meta.get("bins"))


def as_loaded(vae, device="cpu") -> LoadedVAE:
    """``vae`` as a ``LoadedVAE``: a ``LoadedVAE`` as it is, a ``VAE`` wrapped (eval mode, its
    ``vae_hash``, no path), anything else read by ``load_vae(vae, device)``."""
    if isinstance(vae, LoadedVAE):
        return vae
    if isinstance(vae, VAE):
        return LoadedVAE(vae.eval(), {"model": vae.config()}, vae_hash(vae), None, None)
    return load_vae(vae, device)


def torch_device(name) -> torch.device:
    """``name`` (a ``torch.device``, or a string for ``distributed.resolve_device``) as a ``torch.device``."""
    if isinstance(name, torch.device):
        return name
    from ..pipeline.distributed import resolve_device

    return resolve_device(str(name))
