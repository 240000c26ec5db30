"""The latent cache of latent diffusion: the data encoded once by a VAE, with its scaling factor.

``encode_dataset`` encodes the data once (the posterior mean, or one posterior sample per image)
and caches them in a safetensors file together with the *scaling factor*
scale = 1 / std(z) over all elements of the training latents (Rombach et al., Sec. 4.3.2 and
App. G: "we rescale the latents ... to unit standard deviation"). The diffusion model is
trained on scale * z, whose variance is 1 on the training set, so the schedule's N(0, I) end
point matches the data's scale; samples are divided by the scale before decoding
(``decode_latents``). The cache stores the SHA-256 of the VAE (its config and weights,
``vae_checkpoint.vae_hash``) and of the images; a cache read with another VAE raises
``LatentCacheError``. Like a checkpoint, the cache file has a JSON sidecar (``latents.json``
beside ``latents.safetensors``) with the SHA-256 of its bytes: a cache without it, or whose
bytes differ, raises ``LatentCacheError`` with ``damaged = True`` (``train_latent`` then encodes
the data again, with a warning). ``diffmath.latent`` gives the overview.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..nn.vae import VAE
from ..pipeline.data import Data
from ..pipeline.io import atomic_write_json, read_sidecar, safetensors_metadata, save_safetensors, weights_and_sidecar
from .vae_checkpoint import as_loaded
from .vae_train import check_vae_fits

__all__ = [
    "LatentCache",
    "LatentCacheError",
    "LATENTS_FORMAT",
    "scale_factor",
    "encode_dataset",
    "load_latents",
    "decode_latents",
]

LATENTS_FORMAT = "diffmath.latents/1"


class LatentCacheError(ValueError):
    """A latent cache that does not belong to the VAE or data it is used with, or (``damaged``)
    whose bytes cannot be verified against its SHA-256 sidecar."""

    def __init__(self, msg: str, damaged: bool = False):
        super().__init__(msg)
        self.damaged = damaged


def _data_digest(data: Data) -> str:
    h = hashlib.sha256()
    for a in (data.train, data.held_out):
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def scale_factor(latents) -> float:
    """Rombach et al.'s scaling factor 1 / std(z) over every element of the (training) latents,
    in float64 (the population std). ``ValueError`` if the latents are constant or not finite."""
    z = np.asarray(latents, dtype=np.float64)
    if z.size < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"latents must be finite with at least 2 values to have a std; got shape {z.shape}")
    sd = float(z.std())
    if not sd > 0:
        raise ValueError("the latents are constant (std 0): the VAE has collapsed; no scaling factor exists")
    return 1.0 / sd


@dataclass
class LatentCache:
    """Encoded data: ``train``/``held_out`` (N, c, h, w) float32 *unscaled* latents (posterior
    means, or one posterior sample each for mode "sample"), their posterior log-variances,
    the labels (digits), ``scale`` = 1 / std(train), and ``meta`` (vae_hash, data digest, ...)."""

    path: Path | None
    train: np.ndarray
    held_out: np.ndarray
    train_logvar: np.ndarray
    held_out_logvar: np.ndarray
    scale: float
    meta: dict
    labels_train: np.ndarray | None = None
    labels_held_out: np.ndarray | None = None

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.train.shape[1:])

    @property
    def vae_hash(self) -> str:
        return self.meta["vae_hash"]

    def data(self) -> Data:
        """The diffusion model's training set: the scaled latents scale * z (variance 1 on the
        training set), as a continuous ``Data`` (bins None) of kind "image"."""
        return Data(
            f"{self.meta.get('data', {}).get('name', 'data')}-latent",
            "image",
            (self.train * self.scale).astype(np.float32),
            (self.held_out * self.scale).astype(np.float32),
            None,
            self.labels_train,
            self.labels_held_out,
            info={
                "latent_cache": str(self.path) if self.path else None,
                "scale_factor": self.scale,
                "vae_hash": self.vae_hash,
            },
        )

    def check_vae(self, vae) -> None:
        h = vae if isinstance(vae, str) else as_loaded(vae).hash
        if h != self.vae_hash:
            raise LatentCacheError(
                f"the latent cache {str(self.path)!r} was encoded by the VAE with hash {self.vae_hash[:16]}..., "
                "but the "
                f"VAE given has hash {h[:16]}...: the latents belong to another VAE. Re-encode with "
                "encode_dataset(vae, data)"
            )


@torch.no_grad()
def _encode_array(vae: VAE, x: np.ndarray, *, mode: str, generator, batch_size: int, device):
    means, logvars = [], []
    for a in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[a : a + batch_size], dtype=np.float32)).to(device)
        m, lv = vae.encode(xb)
        if mode == "sample":
            m = vae.reparameterize(m, lv, torch.randn(m.shape, generator=generator).to(device))
        means.append(m.float().cpu())
        logvars.append(lv.float().cpu())
    return torch.cat(means).numpy(), torch.cat(logvars).numpy()


def encode_dataset(
    vae, data: Data, path=None, *, mode: str = "mean", seed: int = 0, batch_size: int = 512, device="auto"
) -> LatentCache:
    """Encode ``data`` once with the VAE (a ``LoadedVAE``, a ``VAE`` or a checkpoint path) and,
    if ``path`` is given, cache it there as safetensors (tensors ``train``, ``held_out``,
    ``train_logvar``, ``held_out_logvar``, labels; metadata: format, ``vae_hash``, the VAE
    config, ``scale_factor``, latent shape, ``mode``, the data's SHA-256).

    mode "mean": z = the posterior mean (deterministic); "sample": one draw z ~ q(z | x) per
    image (seeded). The scaling factor is ``scale_factor(train latents)``."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample'; got {mode!r}")
    lv = as_loaded(vae, device)
    check_vae_fits(lv, data.shape, where=f"the {data.name!r} images")
    dev = next(lv.vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    tr, tr_lv = _encode_array(lv.vae, data.train, mode=mode, generator=g, batch_size=batch_size, device=dev)
    ho, ho_lv = _encode_array(lv.vae, data.held_out, mode=mode, generator=g, batch_size=batch_size, device=dev)
    meta = {
        "format": LATENTS_FORMAT,
        "vae_hash": lv.hash,
        "vae_model": lv.vae.config(),
        "vae_checkpoint": str(lv.path) if lv.path else None,
        "scale_factor": scale_factor(tr),
        "latent_shape": list(tr.shape[1:]),
        "mode": mode,
        "seed": seed,
        "data": {
            "name": data.name,
            "shape": list(data.shape),
            "bins": data.bins,
            "train": int(len(tr)),
            "held_out": int(len(ho)),
            "sha256": _data_digest(data),
        },
    }
    cache = LatentCache(
        Path(path) if path else None,
        tr,
        ho,
        tr_lv,
        ho_lv,
        meta["scale_factor"],
        meta,
        data.labels_train,
        data.labels_held_out,
    )
    if path is not None:
        tensors = {
            "train": torch.from_numpy(tr),
            "held_out": torch.from_numpy(ho),
            "train_logvar": torch.from_numpy(tr_lv),
            "held_out_logvar": torch.from_numpy(ho_lv),
        }
        if data.labels_train is not None:
            tensors["labels_train"] = torch.from_numpy(np.asarray(data.labels_train, np.int64))
        if data.labels_held_out is not None:
            tensors["labels_held_out"] = torch.from_numpy(np.asarray(data.labels_held_out, np.int64))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        digest = save_safetensors(path, tensors, LATENTS_FORMAT, meta)
        st, js = weights_and_sidecar(path)
        atomic_write_json(js, {"format": LATENTS_FORMAT, "weights": st.name, "weights_sha256": digest})
    return cache


def load_latents(path, vae=None, data: Data | None = None) -> LatentCache:
    """Read a latent cache (safetensors only). With ``vae`` (a ``LoadedVAE``, ``VAE``, checkpoint
    path or hash string), ``LatentCacheError`` unless the cache was encoded by exactly that VAE;
    with ``data``, unless it was encoded from exactly those images."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"latent cache {str(path)!r} does not exist; create it with encode_dataset(vae, data, path)"
        )
    md = safetensors_metadata(path, LATENTS_FORMAT, "latent cache", LatentCacheError)
    st, js = weights_and_sidecar(path)
    if not js.exists():
        raise LatentCacheError(
            f"the latent cache {str(st)!r} has no {js.name} beside it (the sidecar with its "
            "SHA-256), so it cannot be verified",
            damaged=True,
        )
    read_sidecar(js, st, LATENTS_FORMAT, "latent cache", lambda m: LatentCacheError(m, damaged=True))
    try:
        meta = json.loads(md["meta"])
        t = load_file(str(path))
        missing = [k for k in ("train", "held_out", "train_logvar", "held_out_logvar") if k not in t]
        if missing:
            raise KeyError(f"tensors {missing}")
        for k in ("scale_factor", "latent_shape", "vae_hash", "data"):
            if k not in meta:
                raise KeyError(f"metadata key {k!r}")
        if not isinstance(meta["data"], dict) or not isinstance(meta["data"].get("sha256"), str):
            raise KeyError("metadata key 'data.sha256'")
        scale = float(meta["scale_factor"])
    except (KeyError, ValueError, TypeError) as e:
        raise LatentCacheError(f"{str(path)!r} is not a usable latent cache: it lacks {e}") from e
    cache = LatentCache(
        path,
        t["train"].numpy(),
        t["held_out"].numpy(),
        t["train_logvar"].numpy(),
        t["held_out_logvar"].numpy(),
        scale,
        meta,
        t["labels_train"].numpy() if "labels_train" in t else None,
        t["labels_held_out"].numpy() if "labels_held_out" in t else None,
    )
    if list(cache.latent_shape) != list(meta["latent_shape"]):
        raise LatentCacheError(
            f"{str(path)!r}: latents of shape {cache.latent_shape} but metadata says {meta['latent_shape']}"
        )
    if vae is not None:
        cache.check_vae(vae)
    if data is not None and _data_digest(data) != meta["data"]["sha256"]:
        raise LatentCacheError(
            f"the latent cache {str(path)!r} was encoded from other images than the {data.name!r} data given "
            "(their SHA-256 differs); re-encode with encode_dataset(vae, data)"
        )
    return cache


@torch.no_grad()
def decode_latents(vae, z_scaled, scale: float, *, batch_size: int = 512) -> np.ndarray:
    """Images from scaled latents: the decoder mean m_theta(z_scaled / scale), clipped to the
    data range [-1, 1]. (N, c, h, w) -> (N, C, H, W) float32 numpy."""
    lv = as_loaded(vae)
    v = lv.vae
    dev = next(v.parameters()).device
    z = torch.as_tensor(np.asarray(z_scaled, np.float32))
    outs = []
    for a in range(0, len(z), batch_size):
        outs.append(v.decode(z[a : a + batch_size].to(dev) / scale)[0].clamp(-1, 1).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0,) + lv.image_shape, np.float32)
