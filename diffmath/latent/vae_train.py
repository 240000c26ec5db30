"""VAE training (``train_vae``): Adam on the loss of ``vae_math.vae_loss`` with warm-up and a
cosine decay, then the held-out ELBO in bits/dim and a checkpoint (``vae_checkpoint.save_vae``).
``check_vae_fits`` is its check that images can go through a VAE. ``diffmath.latent`` gives the
overview.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..nn.vae import VAE
from ..pipeline.data import Data, load_data
from .vae_checkpoint import LoadedVAE, load_vae, save_vae, torch_device
from .vae_config import VAEConfig
from .vae_math import elbo, vae_loss

__all__ = ["VAEResult", "check_vae_fits", "train_vae"]


@dataclass
class VAEResult:
    out: Path
    checkpoint: Path
    loaded: LoadedVAE
    losses: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def check_vae_fits(config_or_vae, data_shape, where: str = "the data") -> None:
    """``ValueError`` unless images of ``data_shape`` (C, H, W) can go through the VAE: square,
    side divisible by the down-sampling factor, and (for a built VAE) exactly its image shape."""
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) != 3:
        raise ValueError(f"a VAE needs image data of shape (C, H, W); {where} have samples of shape {data_shape}")
    C, H, W = data_shape
    if isinstance(config_or_vae, VAEConfig):
        f, mult = config_or_vae.factor, config_or_vae.channel_mult
    else:
        v = config_or_vae.vae if isinstance(config_or_vae, LoadedVAE) else config_or_vae
        f, mult = v.factor, v.channel_mult
    if H != W or H % f:
        raise ValueError(
            f"the VAE down-samples by f = {f} (channel_mult = {tuple(mult)}), so images must be square with a side "
            f"divisible by {f}; {where} are {H}x{W}. Choose an image size divisible by {f} or a VAE with fewer levels"
        )
    if not isinstance(config_or_vae, VAEConfig):
        v = config_or_vae.vae if isinstance(config_or_vae, LoadedVAE) else config_or_vae
        if tuple(v.image_shape) != data_shape:
            raise ValueError(f"the VAE takes images of shape {tuple(v.image_shape)}; {where} have shape {data_shape}")


def _lr_at(config: VAEConfig, step: int) -> float:
    from ..pipeline.optim import lr_schedule

    return lr_schedule(config.lr, config.warmup, config.steps, step)  # cosine to 0 at the last step


def train_vae(config: VAEConfig, out, *, data: Data | None = None, overwrite: bool = False) -> VAEResult:
    """Train the VAE on ``config.data`` (or ``data``), then write ``out``/vae.safetensors,
    ``out``/vae.json (with the held-out ELBO in bits/dim and ``vae_hash``) and ``out``/recon.png
    (held-out images above their reconstructions). ``out`` is opened as a run folder
    (``diffmath.rundir.open_run``): refused if it is not empty, unless ``overwrite`` (which
    deletes only the files diffmath wrote there), and locked while the VAE trains; the data are
    checked first. Everything random comes from one ``torch.Generator`` seeded
    with ``config.seed`` (the data order and the reparameterisation noise) and the init from
    ``torch.manual_seed(config.seed)``."""
    from ..pipeline.rundir import open_run

    t0 = time.time()
    out = Path(out)
    if data is None:
        data = load_data(config.data, config.image_size)
    check_vae_fits(config, data.shape, where=f"the {data.name!r} images")
    if data.kind != "image":
        raise ValueError(f"a VAE needs image data; {data.name!r} is {data.kind} data")
    with open_run(out, "train-vae", overwrite=overwrite):
        return _train_vae(config, out, data, t0)


def _train_vae(config: VAEConfig, out: Path, data: Data, t0: float) -> VAEResult:
    from ..pipeline.sample_run import save_grid

    dev = torch_device(config.device)
    torch.manual_seed(config.seed)
    vae = VAE(**config.model_kwargs(data.shape[0])).to(dev)
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    x_all = torch.from_numpy(np.ascontiguousarray(data.train, dtype=np.float32))
    N = x_all.shape[0]
    B = min(config.batch_size, N)
    spe = N // B
    perm = None
    hist = []
    from tqdm.auto import tqdm

    bar = tqdm(range(config.steps), desc="train VAE", disable=not config.progress, dynamic_ncols=True)
    vae.train()
    for step in bar:
        k = step % spe
        if k == 0:
            perm = torch.randperm(N, generator=g)
        x = x_all[perm[k * B : (k + 1) * B]].to(dev)
        noise = torch.randn((B,) + vae.latent_shape, generator=g).to(dev)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(config, step)
        loss, parts = vae_loss(vae, x, noise, data.bins, config.beta)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"the VAE loss became {float(loss.detach())} at step {step}; lower the learning rate (now {config.lr})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        opt.step()
        hist.append(parts["elbo_bpd"])
        if step % 20 == 0:
            bar.set_postfix(elbo_bpd=f"{np.mean(hist[-20:]):.3f}", kl=f"{parts['kl']:.1f}")
    vae.eval()
    train_s = time.time() - t0
    held = torch.from_numpy(np.ascontiguousarray(data.held_out, dtype=np.float32))
    n = len(held)
    if n:
        ge = torch.Generator().manual_seed(config.seed + 1)
        with torch.no_grad():
            e = elbo(vae.cpu(), held, data.bins, samples=config.elbo_samples, generator=ge)
            mean, _ = vae.encode(held)
            recon = vae.decode(mean)[0].clamp(-1, 1)
        vae.to(dev)
        bpd = e["bpd"].numpy()
        metrics = {
            "held_out_elbo_bpd": float(bpd.mean()),
            "held_out_elbo_bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "held_out_recon_nats": float(e["recon"].mean()),
            "held_out_kl_nats": float(e["kl"].mean()),
            "held_out_recon_mse": float(((recon - held) ** 2).mean()),
        }
    else:  # a folder too small to hold any image out
        metrics = {"held_out_elbo_bpd": None, "held_out_elbo_skipped": "no held-out images (the data set is too small)"}
    metrics.update(
        {
            "held_out_images": int(n),
            "elbo_samples": config.elbo_samples,
            "train_seconds": round(train_s, 2),
            "steps": config.steps,
            "final_train_elbo_bpd": float(np.mean(hist[-50:])) if hist else None,
        }
    )
    ck = save_vae(
        out,
        vae,
        config=config,
        bins=data.bins,
        extra={
            "data": {
                "name": data.name,
                "shape": list(data.shape),
                "bins": data.bins,
                "train": int(N),
                "held_out": int(n),
            },
            "metrics": metrics,
            "step": config.steps,
        },
    )
    if n:
        k = min(16, n)
        save_grid(
            out / "recon.png",
            np.concatenate([data.held_out[:k], recon[:k].numpy()]),
            nrow=k,
            title="held-out digits (top) and their reconstructions (bottom)",
        )
    return VAEResult(out, ck, load_vae(ck, dev), hist, metrics, time.time() - t0)
