"""Latent diffusion (Rombach et al. 2022): a VAE, and the same diffusion in its latent space.

**The VAE** (``diffmath.nn.vae.VAE``) has a diagonal Gaussian posterior
q_phi(z | x) = N(mu_phi(x), diag(sigma_phi(x)^2)), the prior p(z) = N(0, I) and a Gaussian
decoder N(m_theta(z), s_theta(z)^2) per pixel, *discretised onto the data's grid*: for data on
``bins`` levels in [-1, 1] (17 for the 8x8 digits, 256 for 8-bit images) p_theta(x | z) is the
probability of x's bin, ``gaussian.discretized_gaussian_log_likelihood(x, m, log s, bins)``
(DDPM eq. 13 with exact normal CDFs), so log p_theta(x | z) <= 0 and the ELBO is a bound on a
true log-probability of the discrete data. It is trained on

    loss(x) = -E_q[log p_theta(x | z)] + beta * KL(q_phi(z | x) || N(0, I))

with one reparameterised sample z = mu + sigma * eps (Kingma & Welling 2014, eq. 10) and the
KL in closed form from ``gaussian.normal_kl(mu, log sigma^2, 0, 0)`` (summed over the latent
dimensions; no second copy of the formula). For beta = 1 the loss is the negative ELBO
(Kingma & Welling eq. 3); ``elbo`` reports it in bits/dim for any beta:

    ELBO(x) = E_q[log p_theta(x | z)] - KL(q || p) <= log p_theta(x),
    bits/dim = -ELBO / (D ln 2),  D = C H W.

``iwae_bound`` is the importance-weighted bound of Burda et al. (2016),
log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x), z_k ~ q: ELBO <= IWAE_K <= log p(x), and
IWAE_K -> log p(x) as K grows.

**The latents.** ``encode_dataset`` encodes the data once (the posterior mean, or one posterior
sample per image) and caches them in a safetensors file together with the *scaling factor*
scale = 1 / std(z) over all elements of the training latents (Rombach et al., Sec. 4.3.2 and
App. G: "we rescale the latents ... to unit standard deviation"). The diffusion model is
trained on scale * z, whose variance is 1 on the training set, so the schedule's N(0, I) end
point matches the data's scale; samples are divided by the scale before decoding. The cache
stores the SHA-256 of the VAE (its config and weights, ``vae_hash``) and of the images; a cache
read with another VAE raises ``LatentCacheError``.

**The latent diffusion model** is the same U-Net, eps-prediction, schedule and training loop as
in pixel space (``diffmath.train.train`` with the latent set as its ``data``), configured to
down-sample less: the latents are small (8x8 digits -> 4x4x2 with the default VAE), so
``channel_mult=(1,)`` (no down-sampling) or ``(1, 2)`` (4 -> 2).

A latent run directory holds::

    latent.json            format, VAE checkpoint and hash, latent shape, scaling factor
    vae/                   vae.safetensors + vae.json (when the VAE was trained by this run), recon.png
    latents.safetensors    the cached latents (unscaled) + scale factor + hashes
    unet/                  the diffusion run (config.json, step-NNNNNN.safetensors/.json, loss.png)
    samples.npz/.png       decoded samples (``sample_latent``), metrics.json, report.md (``demo_latent``)

Nothing is ever unpickled: weights are safetensors, metadata JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Data, load_data
from .gaussian import discretized_gaussian_log_likelihood, normal_kl, normal_log_prob
from .nn.vae import VAE
from .train import DEMO_CONFIG

__all__ = [
    "VAEConfig",
    "LoadedVAE",
    "LatentCache",
    "LatentCacheError",
    "VAE_FORMAT",
    "LATENTS_FORMAT",
    "LATENT_RUN_FORMAT",
    "LATENT_DEMO_CONFIG",
    "VAE_DEMO_CONFIG",
    "kl_to_standard_normal",
    "reconstruction_log_likelihood",
    "vae_loss",
    "elbo",
    "iwae_bound",
    "vae_hash",
    "save_vae",
    "load_vae",
    "train_vae",
    "encode_dataset",
    "load_latents",
    "scale_factor",
    "train_latent",
    "sample_latent",
    "evaluate_latent",
    "decode_latents",
    "read_latent_run",
    "check_vae_fits",
    "check_unet_fits",
    "demo_latent",
    "compare_pixel_latent",
    "comparison_table",
]

VAE_FORMAT = "diffmath.vae/1"
LATENTS_FORMAT = "diffmath.latents/1"
LATENT_RUN_FORMAT = "diffmath.latent-run/1"
LN2 = math.log(2.0)

# The latent U-Net for 4x4 latents: no down-sampling (the pixel demo's U-Net halves 8x8 -> 4x4),
# attention at 4x4 (16 tokens). Otherwise the pixel demo's recipe.
LATENT_DEMO_CONFIG = {**DEMO_CONFIG, "channel_mult": (1,)}  # latents are 4x4: no downsampling


# ============================================================================= the VAE's math
def _per_sample_sum(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


def kl_to_standard_normal(mean, logvar) -> torch.Tensor:
    """KL(N(mean, diag(e^logvar)) || N(0, I)) per sample, in nats, summed over the latent dims:
    ``gaussian.normal_kl(mean, logvar, 0, 0)`` elementwise, then summed. (B, ...) -> (B,)."""
    return _per_sample_sum(normal_kl(mean, logvar, 0.0, 0.0))


def reconstruction_log_likelihood(x, mean, log_scale, bins: int | None) -> torch.Tensor:
    """log p_theta(x | z) per sample, in nats, summed over the pixels.

    ``bins`` an integer: data on the grid of ``bins`` levels in [-1, 1], the discretised Gaussian
    ``gaussian.discretized_gaussian_log_likelihood(x, mean, log_scale, bins)`` (a probability,
    <= 0). ``bins=None``: continuous data, the Gaussian density ``gaussian.normal_log_prob(x,
    mean, 2 log_scale)``. x, mean, log_scale: (B, C, H, W) -> (B,).
    """
    if bins is None:
        return _per_sample_sum(normal_log_prob(x, mean, 2.0 * log_scale))
    return _per_sample_sum(discretized_gaussian_log_likelihood(x, mean, log_scale, bins=int(bins)))


def vae_loss(vae: VAE, x: torch.Tensor, noise: torch.Tensor, bins: int | None, beta: float = 1.0):
    """The training loss, nats per dimension, mean over the batch:

    loss = mean_B [ -log p_theta(x | z) + beta KL(q_phi(z | x) || N(0, I)) ] / D,
    z = mean + exp(logvar / 2) * noise (one reparameterised sample per image).

    Returns (loss, parts) with parts (detached, per-sample means): ``nll`` and ``kl`` in nats
    per image, ``elbo_bpd`` = (nll + kl) / (D ln 2) (the beta = 1 bound, whatever beta).
    """
    z, mean, logvar, dmean, dlog_scale = vae(x, noise)
    nll = -reconstruction_log_likelihood(x, dmean, dlog_scale, bins)
    kl = kl_to_standard_normal(mean, logvar)
    D = x[0].numel()
    loss = (nll + beta * kl).mean() / D
    with torch.no_grad():
        parts = {"nll": float(nll.mean()), "kl": float(kl.mean()), "elbo_bpd": float((nll + kl).mean()) / (D * LN2)}
    return loss, parts


@torch.no_grad()
def elbo(vae: VAE, x, bins: int | None, *, samples: int = 1, generator: torch.Generator | None = None):
    """ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || N(0, I)) per image, estimated with ``samples``
    reparameterised draws for the expectation (the KL is exact). Returns a dict of (B,) float64
    tensors: ``elbo`` (nats), ``bpd`` (= -elbo / (D ln 2)), ``recon`` (E log p(x|z), nats), ``kl``."""
    x = torch.as_tensor(x)
    mean, logvar = vae.encode(x)
    kl = kl_to_standard_normal(mean, logvar).double()
    rec = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(samples):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        dm, dls = vae.decode(vae.reparameterize(mean, logvar, noise))
        rec += reconstruction_log_likelihood(x, dm, dls, bins).double()
    rec /= samples
    e = rec - kl
    D = x[0].numel()
    return {"elbo": e, "bpd": -e / (D * LN2), "recon": rec, "kl": kl}


@torch.no_grad()
def iwae_bound(vae: VAE, x, bins: int | None, k: int, *, generator: torch.Generator | None = None, chunk: int = 1024):
    """The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, eq. 8), per image, nats:

    IWAE_K(x) = log (1/K) sum_{k=1..K} p_theta(x | z_k) p(z_k) / q_phi(z_k | x),  z_k ~ q_phi(z | x),

    with log p(z) and log q(z | x) from ``gaussian.normal_log_prob``. E[IWAE_1] = ELBO and
    ELBO <= E[IWAE_K] <= E[IWAE_{K+1}] <= log p(x). x: (B, C, H, W) -> (B,) float64."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of importance samples) must be a positive integer; got {k!r}")
    x = torch.as_tensor(x)
    mean, logvar = vae.encode(x)
    out = []
    for i in range(x.shape[0]):
        m, lv, xi = mean[i : i + 1], logvar[i : i + 1], x[i : i + 1]
        logw = []
        for a in range(0, k, chunk):
            n = min(chunk, k - a)
            noise = torch.randn((n,) + tuple(m.shape[1:]), generator=generator, device=m.device, dtype=m.dtype)
            z = vae.reparameterize(m.expand(n, *m.shape[1:]), lv.expand(n, *lv.shape[1:]), noise)
            dm, dls = vae.decode(z)
            lp_x = reconstruction_log_likelihood(xi.expand(n, *xi.shape[1:]), dm, dls, bins).double()
            lp_z = _per_sample_sum(normal_log_prob(z, 0.0, 0.0)).double()
            lq_z = _per_sample_sum(normal_log_prob(z, m, lv)).double()
            logw.append(lp_x + lp_z - lq_z)
        lw = torch.cat(logw)
        out.append(torch.logsumexp(lw, 0) - math.log(k))
    return torch.stack(out)


# ============================================================================= configuration
@dataclass
class VAEConfig:
    """A VAE training run (stored in vae.json).

    Data: ``data`` (a ``diffmath.data.load_data`` spec), ``image_size``. Model (``nn.vae.VAE``):
    ``channels``, ``channel_mult`` (down-sampling factor f = 2**(len - 1)), ``latent_channels``,
    ``num_res_blocks``. Loss: ``beta`` (the KL weight; 1 = the ELBO). Optimisation: Adam with
    ``lr``, linear warm-up over ``warmup`` steps then a cosine decay to 0 at ``steps``,
    ``batch_size``, ``grad_clip``. ``elbo_samples``: z-draws per image for the held-out ELBO.
    """

    data: str = "digits"
    image_size: int = 8
    channels: int = 16
    channel_mult: tuple = (1, 2)
    latent_channels: int = 2
    num_res_blocks: int = 1
    beta: float = 1.0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    grad_clip: float = 1.0
    elbo_samples: int = 8
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.channel_mult = tuple(int(c) for c in self.channel_mult)
        for n in ("image_size", "channels", "latent_channels", "num_res_blocks", "steps", "batch_size", "elbo_samples"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{n} must be a positive integer; got {n} = {v!r}")
        for n in ("warmup", "seed"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{n} must be an integer >= 0; got {n} = {v!r}")
        if not self.channel_mult or any(c < 1 for c in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers; got {self.channel_mult}")
        for n, ok in (("beta", lambda v: v >= 0), ("lr", lambda v: v > 0), ("grad_clip", lambda v: v >= 0)):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{n} must be a finite number {'> 0' if n == 'lr' else '>= 0'}; got {n} = {v!r}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def model_kwargs(self, in_channels: int) -> dict:
        return dict(in_channels=int(in_channels), image_size=self.image_size, channels=self.channels,
                    channel_mult=self.channel_mult, latent_channels=self.latent_channels,
                    num_res_blocks=self.num_res_blocks)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        from .train import config_from_dict

        return config_from_dict(cls, d, "VAE config")


VAE_DEMO_CONFIG = dict(data="digits", image_size=8, steps=1500, batch_size=128, lr=2e-3, beta=1.0, seed=0)


# ============================================================================= checkpoints
def _diffmath_metadata(path, fmt: str, what: str, error=ValueError) -> dict:
    """The safetensors header metadata of ``path``, which must carry ``format=fmt``; ``error``
    naming the file otherwise (unreadable, or not a diffmath ``what``)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if md.get("format") != fmt:
        raise error(f"{str(path)!r} is not a diffmath {what} (its metadata lacks format={fmt!r})")
    return md


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


def _atomic_write_bytes(path: Path, data: bytes):
    from .train import _atomic_write_bytes as w

    w(Path(path), data)


def _atomic_write_json(path: Path, obj):
    _atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_vae(out, vae: VAE, *, config: VAEConfig | None = None, bins: int | None = None, extra: dict | None = None) -> Path:
    """Write ``out``/vae.safetensors (weights ``vae.*``; metadata format + the JSON below) and
    ``out``/vae.json (format, model config, training config, ``vae_hash``, SHA-256 of the
    .safetensors file, latent shape, bins, ``extra``). Returns the .json path."""
    from safetensors.torch import save

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
    blob = save(vae_cpu, metadata={"format": VAE_FORMAT, "meta": json.dumps(meta)})
    _atomic_write_bytes(out / "vae.safetensors", blob)
    meta = {**meta, "weights": "vae.safetensors", "weights_sha256": hashlib.sha256(blob).hexdigest(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _atomic_write_json(out / "vae.json", meta)
    return out / "vae.json"


def _vae_paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        p = p / "vae.json"
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    return p.with_suffix(".safetensors"), p


def load_vae(path, device: str | torch.device = "cpu") -> LoadedVAE:
    """Read a VAE checkpoint (its folder, vae.json or vae.safetensors; safetensors only, never
    pickle), rebuild the VAE from the stored config and check its weights: the file's SHA-256
    against vae.json and the recomputed ``vae_hash`` against the stored one (``ValueError``
    naming the file if either differs, or if the file is not a diffmath VAE)."""
    from safetensors.torch import load_file

    st, js = _vae_paths(path)
    if not st.exists():
        raise FileNotFoundError(f"VAE checkpoint {str(st)!r} does not exist (give a folder with vae.json, or the .json/.safetensors)")
    md = _diffmath_metadata(st, VAE_FORMAT, "VAE checkpoint", ValueError)
    if js.exists():
        try:
            meta = json.loads(js.read_text())
        except ValueError as e:
            raise ValueError(f"{str(js)!r} is not valid JSON: {e}") from e
        if meta.get("format") != VAE_FORMAT:
            raise ValueError(f"{str(js)!r} is not a diffmath VAE checkpoint (expected format {VAE_FORMAT!r})")
        digest = hashlib.sha256(st.read_bytes()).hexdigest()
        if meta.get("weights_sha256") and meta["weights_sha256"] != digest:
            raise ValueError(f"{str(st)!r} does not match {str(js)!r} (SHA-256 differs): the checkpoint is damaged")
    else:
        meta = json.loads(md.get("meta", "{}"))
    try:
        vae = VAE(**meta["model"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{str(js)!r} holds no usable VAE config: {e}") from e
    tensors = load_file(str(st))
    try:
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    except RuntimeError as e:
        raise ValueError(f"the weights in {str(st)!r} do not fit the VAE its config describes: {e}") from e
    h = vae_hash(vae)
    if meta.get("vae_hash") and meta["vae_hash"] != h:
        raise ValueError(f"{str(st)!r}: the weights hash to {h[:16]}... but the checkpoint says {meta['vae_hash'][:16]}...")
    vae.to(_device(device)).eval()
    return LoadedVAE(vae, meta, h, js if js.exists() else st, meta.get("bins"))


def _as_loaded(vae, device="cpu") -> LoadedVAE:
    if isinstance(vae, LoadedVAE):
        return vae
    if isinstance(vae, VAE):
        return LoadedVAE(vae.eval(), {"model": vae.config()}, vae_hash(vae), None, None)
    return load_vae(vae, device)


def _device(name) -> torch.device:
    if isinstance(name, torch.device):
        return name
    from .train import resolve_device

    return resolve_device(str(name))


# ============================================================================= VAE training
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
    from .train import lr_schedule

    return lr_schedule(config.lr, config.warmup, config.steps, step)  # cosine to 0 at the last step


def train_vae(config: VAEConfig, out, *, data: Data | None = None, overwrite: bool = False) -> VAEResult:
    """Train the VAE on ``config.data`` (or ``data``), then write ``out``/vae.safetensors,
    ``out``/vae.json (with the held-out ELBO in bits/dim and ``vae_hash``) and ``out``/recon.png
    (held-out images above their reconstructions). Refuses an ``out`` that already holds a
    vae.json unless ``overwrite``. Everything random comes from one ``torch.Generator`` seeded
    with ``config.seed`` (the data order and the reparameterisation noise) and the init from
    ``torch.manual_seed(config.seed)``."""
    from .sample import save_grid

    t0 = time.time()
    out = Path(out)
    if (out / "vae.json").exists() and not overwrite:
        from .train import RunError

        raise RunError(f"{str(out)!r} already holds a VAE (vae.json); pass overwrite=True to replace it")
    if data is None:
        data = load_data(config.data, config.image_size)
    check_vae_fits(config, data.shape, where=f"the {data.name!r} images")
    if data.kind != "image":
        raise ValueError(f"a VAE needs image data; {data.name!r} is {data.kind} data")
    dev = _device(config.device)
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
            raise FloatingPointError(f"the VAE loss became {float(loss.detach())} at step {step}; lower the learning rate (now {config.lr})")
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
    held = torch.from_numpy(np.ascontiguousarray(data.held_out, dtype=np.float32)).to(dev)
    ge = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        e = elbo(vae.cpu(), held.cpu(), data.bins, samples=config.elbo_samples, generator=ge)
        mean, _ = vae.encode(held.cpu())
        recon = vae.decode(mean)[0].clamp(-1, 1)
    vae.to(dev)
    n = len(held)
    bpd = e["bpd"].numpy()
    metrics = {
        "held_out_elbo_bpd": float(bpd.mean()),
        "held_out_elbo_bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "held_out_recon_nats": float(e["recon"].mean()),
        "held_out_kl_nats": float(e["kl"].mean()),
        "held_out_recon_mse": float(((recon - held.cpu()) ** 2).mean()),
        "held_out_images": int(n),
        "elbo_samples": config.elbo_samples,
        "train_seconds": round(train_s, 2),
        "steps": config.steps,
        "final_train_elbo_bpd": float(np.mean(hist[-50:])) if hist else None,
    }
    ck = save_vae(out, vae, config=config, bins=data.bins,
                  extra={"data": {"name": data.name, "shape": list(data.shape), "bins": data.bins,
                                  "train": int(N), "held_out": int(n)}, "metrics": metrics, "step": config.steps})
    k = min(16, n)
    save_grid(out / "recon.png", np.concatenate([data.held_out[:k], recon[:k].numpy()]), nrow=k,
              title="held-out digits (top) and their reconstructions (bottom)")
    return VAEResult(out, ck, load_vae(ck, dev), hist, metrics, time.time() - t0)


# ============================================================================= the latent cache
class LatentCacheError(ValueError):
    """A latent cache that does not belong to the VAE or data it is used with."""


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
            f"{self.meta.get('data', {}).get('name', 'data')}-latent", "image",
            (self.train * self.scale).astype(np.float32), (self.held_out * self.scale).astype(np.float32), None,
            self.labels_train, self.labels_held_out,
            info={"latent_cache": str(self.path) if self.path else None, "scale_factor": self.scale,
                  "vae_hash": self.vae_hash},
        )

    def check_vae(self, vae) -> None:
        h = vae if isinstance(vae, str) else _as_loaded(vae).hash
        if h != self.vae_hash:
            raise LatentCacheError(
                f"the latent cache {str(self.path)!r} was encoded by the VAE with hash {self.vae_hash[:16]}..., but the "
                f"VAE given has hash {h[:16]}...: the latents belong to another VAE. Re-encode with encode_dataset(vae, data)"
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


def encode_dataset(vae, data: Data, path=None, *, mode: str = "mean", seed: int = 0, batch_size: int = 512,
                   device="auto") -> LatentCache:
    """Encode ``data`` once with the VAE (a ``LoadedVAE``, a ``VAE`` or a checkpoint path) and,
    if ``path`` is given, cache it there as safetensors (tensors ``train``, ``held_out``,
    ``train_logvar``, ``held_out_logvar``, labels; metadata: format, ``vae_hash``, the VAE
    config, ``scale_factor``, latent shape, ``mode``, the data's SHA-256).

    mode "mean": z = the posterior mean (deterministic); "sample": one draw z ~ q(z | x) per
    image (seeded). The scaling factor is ``scale_factor(train latents)``."""
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample'; got {mode!r}")
    lv = _as_loaded(vae, device)
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
        "data": {"name": data.name, "shape": list(data.shape), "bins": data.bins, "train": int(len(tr)),
                 "held_out": int(len(ho)), "sha256": _data_digest(data)},
    }
    cache = LatentCache(Path(path) if path else None, tr, ho, tr_lv, ho_lv, meta["scale_factor"], meta,
                        data.labels_train, data.labels_held_out)
    if path is not None:
        from safetensors.torch import save

        tensors = {"train": torch.from_numpy(tr), "held_out": torch.from_numpy(ho),
                   "train_logvar": torch.from_numpy(tr_lv), "held_out_logvar": torch.from_numpy(ho_lv)}
        if data.labels_train is not None:
            tensors["labels_train"] = torch.from_numpy(np.asarray(data.labels_train, np.int64))
        if data.labels_held_out is not None:
            tensors["labels_held_out"] = torch.from_numpy(np.asarray(data.labels_held_out, np.int64))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(Path(path), save(tensors, metadata={"format": LATENTS_FORMAT, "meta": json.dumps(meta)}))
    return cache


def load_latents(path, vae=None, data: Data | None = None) -> LatentCache:
    """Read a latent cache (safetensors only). With ``vae`` (a ``LoadedVAE``, ``VAE``, checkpoint
    path or hash string), ``LatentCacheError`` unless the cache was encoded by exactly that VAE;
    with ``data``, unless it was encoded from exactly those images."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"latent cache {str(path)!r} does not exist; create it with encode_dataset(vae, data, path)")
    md = _diffmath_metadata(path, LATENTS_FORMAT, "latent cache", LatentCacheError)
    meta = json.loads(md["meta"])
    t = load_file(str(path))
    cache = LatentCache(
        path, t["train"].numpy(), t["held_out"].numpy(), t["train_logvar"].numpy(), t["held_out_logvar"].numpy(),
        float(meta["scale_factor"]), meta,
        t["labels_train"].numpy() if "labels_train" in t else None,
        t["labels_held_out"].numpy() if "labels_held_out" in t else None,
    )
    if list(cache.latent_shape) != list(meta["latent_shape"]):
        raise LatentCacheError(f"{str(path)!r}: latents of shape {cache.latent_shape} but metadata says {meta['latent_shape']}")
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
    lv = _as_loaded(vae)
    v = lv.vae
    dev = next(v.parameters()).device
    z = torch.as_tensor(np.asarray(z_scaled, np.float32))
    outs = []
    for a in range(0, len(z), batch_size):
        outs.append(v.decode(z[a : a + batch_size].to(dev) / scale)[0].clamp(-1, 1).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0,) + lv.image_shape, np.float32)


# ============================================================================= latent diffusion
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
        raise ValueError("learn_sigma is not supported in latent space (its VLB term assumes data on a grid in [-1, 1])")


def _unet_data_shape(run: Path):
    from .train import latest_checkpoint

    ck = latest_checkpoint(run)
    if ck is None:
        return None
    return tuple(json.loads(ck.read_text()).get("data_shape", ()))


def read_latent_run(out) -> dict:
    """latent.json of a latent run directory (``ValueError`` if absent or not ours)."""
    p = Path(out) / "latent.json"
    if not p.exists():
        from .train import RunError

        raise RunError(f"{str(out)!r} is not a latent diffusion run: it has no latent.json")
    d = json.loads(p.read_text())
    if d.get("format") != LATENT_RUN_FORMAT:
        raise ValueError(f"{str(p)!r} is not a diffmath latent run (expected format {LATENT_RUN_FORMAT!r})")
    return d


def _resolve(out: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else out / q


def _rel(out: Path, p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(Path(p).resolve())


_LATENT_FILES = ("latent.json", "latents.safetensors", "samples.npz", "samples.png", "metrics.json", "report.md")


def train_latent(out, config=None, *, vae=None, vae_config: VAEConfig | None = None, data: Data | None = None,
                 resume: bool = False, overwrite: bool = False, encode_mode: str = "mean",
                 stop_after: int | None = None, progress: bool | None = None) -> LatentResult:
    """Latent diffusion in ``out`` (layout in the module docstring):

    1. the VAE: ``vae`` (a checkpoint path or ``LoadedVAE``) if given; with ``resume`` the run's
       own; else train one with ``vae_config`` (default ``VAEConfig()``; its data and image size
       are taken from ``config``) into ``out``/vae;
    2. the latents: ``encode_dataset`` into ``out``/latents.safetensors (reused when its VAE hash
       and data digest match; with ``resume`` a mismatch is an error);
    3. the diffusion model: ``diffmath.train.train(config, out/unet, data=<scaled latents>)``,
       ``config`` a ``TrainConfig`` (default ``LATENT_DEMO_CONFIG``) whose ``data``/``image_size``
       name the *image* data (what the VAE encodes).

    ``resume`` continues the diffusion run (the VAE and latents must be those of the run);
    ``overwrite`` replaces a run in ``out``. ``stop_after``: as in ``train``.
    """
    from .train import RunError, TrainConfig, train

    t0 = time.time()
    out = Path(out)
    if config is None:
        config = TrainConfig(**LATENT_DEMO_CONFIG)
    if progress is not None:
        config = dataclasses.replace(config, progress=progress)
    if resume and overwrite:
        raise RunError("resume and overwrite contradict each other; pick one")
    if config.learn_sigma:  # refused before anything is written or trained (check_unet_fits says it again)
        raise ValueError("learn_sigma is not supported in latent space (its VLB term assumes data on a grid in [-1, 1])")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} exists and is a file, not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    run_info = None
    if resume:
        run_info = read_latent_run(out)
    elif nonempty:
        if not overwrite:
            raise RunError(f"--out {str(out)!r} already exists and is not empty; pass resume=True to continue that run "
                           "or overwrite=True to replace it")
        for name in _LATENT_FILES:
            if (out / name).is_file():
                (out / name).unlink()
        keep = None  # a VAE given from inside out/vae survives the overwrite
        if isinstance(vae, LoadedVAE) and vae.path is not None:
            keep = Path(vae.path).resolve().parent
        elif vae is not None and not isinstance(vae, VAE):
            keep = _vae_paths(vae)[1].resolve().parent
        for sub, marker in (("vae", "vae.json"), ("unet", "config.json")):
            if (out / sub / marker).exists() and (out / sub).resolve() != keep:
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_data(config.data, config.image_size)
    timings = {}

    # 1. the VAE
    vae_metrics = {}
    if vae is not None:
        lv = _as_loaded(vae, config.device)
        if lv.path is None:
            raise ValueError("train_latent needs a saved VAE (a checkpoint path or load_vae(...)) so the run can refer to it")
        if run_info is not None and lv.hash != run_info["vae_hash"]:
            raise LatentCacheError(
                f"the VAE given (hash {lv.hash[:16]}...) is not the one the run in {str(out)!r} was trained with "
                f"(hash {run_info['vae_hash'][:16]}...); a resumed run keeps its VAE"
            )
    elif run_info is not None:
        lv = load_vae(_resolve(out, run_info["vae_checkpoint"]), config.device)
        if lv.hash != run_info["vae_hash"]:
            raise LatentCacheError(f"the VAE checkpoint of {str(out)!r} has changed since the run started (hash mismatch)")
    else:
        vc = vae_config if vae_config is not None else VAEConfig()
        vc = dataclasses.replace(vc, data=config.data, image_size=config.image_size, device=config.device,
                                 progress=config.progress)
        check_vae_fits(vc, data.shape, where=f"the {data.name!r} images")
        # the U-Net must take the latents this VAE will make: refused before the VAE is trained
        check_unet_fits(config, (vc.latent_channels, data.shape[1] // vc.factor, data.shape[2] // vc.factor))
        res = train_vae(vc, out / "vae", data=data)
        lv = res.loaded
        timings["vae_train_s"] = round(res.seconds, 2)
        vae_metrics = res.metrics
    if not vae_metrics:
        vae_metrics = dict(lv.meta.get("metrics", {}))
    check_vae_fits(lv, data.shape, where=f"the {data.name!r} images")
    check_unet_fits(config, lv.latent_shape)

    # 2. the latents
    cache_path = out / "latents.safetensors"
    t1 = time.time()
    cache = None
    if cache_path.exists():
        try:
            cache = load_latents(cache_path, vae=lv, data=data)
            if cache.meta.get("mode") != encode_mode:
                cache = None
        except LatentCacheError:
            if resume:
                raise
            cache = None
    if cache is None:
        if resume and (out / "unet").exists() and _unet_data_shape(out / "unet") is not None:
            raise LatentCacheError(f"{str(cache_path)!r} is missing or stale; the run in {str(out)!r} cannot be resumed")
        cache = encode_dataset(lv, data, cache_path, mode=encode_mode, seed=config.seed)
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
    _atomic_write_json(out / "latent.json", {
        "format": LATENT_RUN_FORMAT,
        "vae_checkpoint": _rel(out, lv.path),
        "vae_hash": lv.hash,
        "latent_shape": list(cache.latent_shape),
        "image_shape": list(lv.image_shape),
        "scale_factor": cache.scale,
        "latent_cache": "latents.safetensors",
        "encode_mode": encode_mode,
        "unet_run": "unet",
        "data": {"spec": config.data, "image_size": config.image_size, "bins": data.bins},
        "vae_metrics": vae_metrics,
    })
    t2 = time.time()
    res = train(config, unet_dir, resume=resume and unet_dir.exists(), overwrite=overwrite, data=cache.data(),
                stop_after=stop_after)
    timings["unet_train_s"] = round(time.time() - t2, 2)
    timings["total_s"] = round(time.time() - t0, 2)
    return LatentResult(out, lv.path, cache_path, res, cache.scale, cache.latent_shape, timings, vae_metrics)


def sample_latent(run, out=None, *, vae=None, sampler: str = "ddim", steps=None, eta: float = 0.0,
                  num_samples: int = 500, seed: int = 0, device: str = "auto", batch_size: int = 500,
                  progress: bool = False, ema: bool = True) -> tuple[np.ndarray, dict]:
    """Sample a latent run: draw scaled latents with ``diffmath.sample.generate`` (any sampler
    of the pixel pipeline) from the U-Net in ``run``/unet, divide by the scaling factor and decode
    with the run's VAE (``vae`` overrides it; it must make latents of the U-Net's shape and have
    the run's hash). Returns (images (N, C, H, W) float32 in [-1, 1], info); with ``out``, writes
    ``out``/samples.npz (``samples``, ``latents`` (scaled), ``info``) and ``out``/samples.png."""
    from .sample import generate, load_model, save_grid

    run = Path(run)
    info_run = read_latent_run(run)
    lm = load_model(run=run / info_run.get("unet_run", "unet"), device=device, ema=ema)
    lv = _as_loaded(vae, lm.device) if vae is not None else load_vae(_resolve(run, info_run["vae_checkpoint"]), lm.device)
    if tuple(lm.data_shape) != tuple(lv.latent_shape):
        raise ValueError(
            f"the VAE makes latents of shape {tuple(lv.latent_shape)} but the U-Net of {str(run)!r} was trained on "
            f"latents of shape {tuple(lm.data_shape)}: this VAE cannot decode its samples"
        )
    if lv.hash != info_run["vae_hash"]:
        raise LatentCacheError(
            f"the VAE given (hash {lv.hash[:16]}...) is not the one whose latents the U-Net of {str(run)!r} was trained on "
            f"(hash {info_run['vae_hash'][:16]}...)"
        )
    scale = float(info_run["scale_factor"])
    t0 = time.time()
    # latents are not in [-1, 1]: never clip the predicted x0 to the pixel range
    z = generate(lm, num_samples, sampler=sampler, steps=steps, eta=eta, seed=seed, batch_size=batch_size,
                 progress=progress, clip_x0=None)
    t1 = time.time()
    x = decode_latents(lv, z, scale, batch_size=batch_size)
    t2 = time.time()
    from .sample import sampling_info

    info = sampling_info(lm, sampler, steps, eta, num_samples, seed, ema, clip_x0=None)
    info.update({
        "latent": True,
        "latent_shape": list(lv.latent_shape),
        "scale_factor": scale,
        "vae_hash": lv.hash,
        "seconds_latent": round(t1 - t0, 3),
        "seconds_decode": round(t2 - t1, 3),
        "seconds": round(t2 - t0, 3),
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, samples=x, latents=z.astype(np.float32), info=np.str_(json.dumps(info)))
        _atomic_write_bytes(out / "samples.npz", buf.getvalue())
        save_grid(out / "samples.png", x, title=f"latent {sampler}, {num_samples} samples")
    return x, info


def evaluate_latent(run, samples=None, out=None, *, device: str = "auto", progress: bool = False) -> dict:
    """``diffmath evaluate`` for a latent run: the pixel pipeline's sample metrics
    (``evaluate.evaluate_run`` on ``run``/unet, whose config names the image data) of the
    decoded samples (default ``run``/samples.npz), with the VAE's metrics and the latent shape
    and scale added; no test VLB (the diffusion bound lives in latent space). Writes
    ``out``/metrics.json (default ``run``)."""
    from .evaluate import evaluate_run
    from .train import _atomic_write_json as write_json

    run = Path(run)
    info = read_latent_run(run)
    out = Path(out) if out is not None else run
    samples = Path(samples) if samples is not None else run / "samples.npz"
    m = evaluate_run(run / info.get("unet_run", "unet"), samples=samples, out=out, vlb_images=0, device=device,
                     progress=progress)
    m["vae"] = info.get("vae_metrics", {})
    m["latent"] = {"shape": info["latent_shape"], "scale_factor": info["scale_factor"], "vae_hash": info["vae_hash"]}
    m["test_vlb"] = "not reported for latent runs (the diffusion VLB is a bound in latent space; see vae.held_out_elbo_bpd)"
    write_json(out / "metrics.json", m)
    return m


def _evaluate_images(run_dir: Path, x: np.ndarray, where: Path, device: str, progress: bool) -> dict:
    """The pixel pipeline's sample metrics (``evaluate.evaluate_run`` with no test VLB) of the
    images ``x``, judged against the data of the run in ``run_dir``."""
    from .evaluate import evaluate_run

    where.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, samples=np.asarray(x, np.float32), info=np.str_("{}"))
    _atomic_write_bytes(where / "samples.npz", buf.getvalue())
    return evaluate_run(run_dir, samples=where / "samples.npz", out=where, vlb_images=0, device=device, progress=progress)


def demo_latent(out=Path("runs/demo-latent"), *, overwrite: bool = False, device: str = "auto", progress: bool = True,
                config_overrides: dict | None = None, vae_overrides: dict | None = None, num_samples: int = 500,
                sampler: str = "ddim", steps: int = 50) -> dict:
    """The latent counterpart of ``diffmath demo``: train the VAE and the latent U-Net on the
    8x8 digits (or reuse a finished demo run in ``out``), sample with DDIM, evaluate the decoded
    samples with the pixel pipeline's metrics, and write ``out``/report.md. Returns the metrics
    (with ``timings`` and ``vae``)."""
    from .train import RunError, TrainConfig, check_compatible, read_run_config

    out = Path(out)
    config = TrainConfig(**{**LATENT_DEMO_CONFIG, "device": device, "progress": progress, **(config_overrides or {})})
    vc = VAEConfig(**{**VAE_DEMO_CONFIG, "device": device, "progress": progress, **(vae_overrides or {})})
    resume = False
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        try:
            read_latent_run(out)
            check_compatible(read_run_config(out / "unet")["config"], config, where=str(out / "unet" / "config.json"))
            resume = True
        except (RunError, ValueError) as e:
            raise RunError(f"--out {str(out)!r} holds something other than this latent demo run ({e}); pass "
                           "--overwrite or another --out") from None
    t0 = time.time()
    res = train_latent(out, config, vae_config=vc, resume=resume, overwrite=overwrite)
    if res.unet.interrupted:
        raise KeyboardInterrupt
    t1 = time.time()
    x, info = sample_latent(out, out, sampler=sampler, steps=steps, num_samples=num_samples, device=device, progress=progress)
    t2 = time.time()
    metrics = evaluate_latent(out, device=device, progress=progress)
    t3 = time.time()
    metrics["timings"] = {**res.timings, "train_s": round(t1 - t0, 1), "sample_s": round(t2 - t1, 1),
                          "evaluate_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1)}
    metrics["vae"] = res.vae_metrics
    metrics["latent"] = {"shape": list(res.latent_shape), "scale_factor": res.scale}
    _atomic_write_json(out / "metrics.json", metrics)
    _write_latent_report(out, metrics, config, info, res)
    return metrics


def _write_latent_report(out: Path, m: dict, config, info: dict, res: LatentResult) -> Path:
    v = m.get("vae", {})
    L = ["# diffmath latent diffusion demo", ""]
    L.append(f"VAE: 8x8 digits -> latents of shape {tuple(res.latent_shape)}, scaling factor {res.scale:.4f} "
             f"(1/std of the training latents). Held-out ELBO {v.get('held_out_elbo_bpd', float('nan')):.3f} "
             f"± {v.get('held_out_elbo_bpd_stderr') or 0:.3f} bits/dim (17-level discretised decoder).")
    L.append("")
    L.append(f"Latent U-Net: channel_mult {tuple(config.channel_mult)}, {config.steps} steps of batch {config.batch_size}, "
             f"{config.schedule} schedule, T = {config.timesteps}. Sampler {info['sampler']} with {info['steps']} steps, "
             f"{info['num_samples']} samples.")
    L.append("")
    L.append("| metric | samples | reference |")
    L.append("|---|---|---|")
    if "mean_confidence" in m:
        rh = m["real_held_out"]
        L.append(f"| mean classifier confidence | {m['mean_confidence']:.3f} | real held-out: {rh['mean_confidence']:.3f} |")
        L.append(f"| digit classes present | {m['classes_present']} / 10 | real held-out: {rh['classes_present']} / 10 |")
        L.append(f"| class entropy (bits) | {m['class_entropy_bits']:.3f} | uniform: {m['max_entropy_bits']:.3f} |")
    if "frechet_distance" in m:
        fd = m["frechet_distance"]
        L.append(f"| Fréchet distance (n = {fd['n']}) | {fd['samples']:.3f} | floor: {fd['held_out_real (floor)']:.3f}; "
                 f"ceiling: {fd['gaussian_noise (ceiling)']:.3f} |")
    L.append("")
    L.append("Samples: ![samples](samples.png)  VAE reconstructions: ![recon](vae/recon.png)")
    L.append("")
    L.append(f"Timings (s): {m.get('timings')}")
    p = out / "report.md"
    _atomic_write_bytes(p, ("\n".join(L) + "\n").encode())
    return p


# ============================================================================= the comparison
def _train_for_budget(config, out: Path, data: Data, budget_s: float, *, chunk_s: float = 30.0) -> dict:
    """Train ``config`` on ``data`` in ``out`` for ``budget_s`` seconds of wall clock (all of
    ``train``'s own time counted: start-up, steps, checkpoints), in chunks of about ``chunk_s``
    joined by ``resume`` (bit-identical to one uninterrupted run; ``config.steps`` is only an
    upper bound, so the learning rate must not depend on it). Returns steps and seconds."""
    from .train import list_checkpoints, train

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
            p.unlink()
            p.with_suffix(".safetensors").unlink(missing_ok=True)
    return {"steps": steps, "train_s": round(spent, 2), "s_per_step": spent / max(1, steps)}


def compare_pixel_latent(out, *, budget_s: float = 120.0, vae_config: VAEConfig | None = None, pixel_config=None,
                         latent_config=None, num_samples: int = 500, sampler: str = "ddim", steps: int = 50,
                         device: str = "cpu", progress: bool = False, overwrite: bool = False) -> dict:
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
    """
    import platform

    from .sample import sample_run
    from .train import RunError, TrainConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{str(out)!r} is not empty; pass overwrite=True")
        for sub in ("pixel", "latent", "recon"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    big = 10**7
    common = dict(steps=big, lr_decay_steps=0, save_every=big, device=device, progress=False)
    pcfg = dataclasses.replace(pixel_config or TrainConfig(**_pixel_demo_config()), **common)
    lcfg = dataclasses.replace(latent_config or TrainConfig(**LATENT_DEMO_CONFIG), **common)
    vc = vae_config or VAEConfig(**{**VAE_DEMO_CONFIG, "device": device, "progress": progress})
    data = load_data("digits", 8)
    result = {"budget_s": budget_s, "num_samples": num_samples, "sampler": sampler, "sampler_steps": steps,
              "device": device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "torch": torch.__version__}

    # pixel space
    t = _train_for_budget(pcfg, out / "pixel", data, budget_s)
    si = sample_run(out / "pixel", run=out / "pixel", sampler=sampler, steps=steps, num_samples=num_samples,
                    device=device, progress=progress)
    from .evaluate import evaluate_run

    mp = evaluate_run(out / "pixel", vlb_images=0, device=device, progress=progress)
    result["pixel"] = {**t, "sample_s": si["seconds"], "params": _params(out / "pixel"), "data_shape": list(data.shape),
                       "channel_mult": list(pcfg.channel_mult), "metrics": _headline(mp)}

    # latent space: the VAE (one-off), the cache, then the same budget for the U-Net
    lat = out / "latent"
    t0 = time.perf_counter()
    vres = train_vae(dataclasses.replace(vc, data="digits", image_size=8), lat / "vae", data=data)
    vae_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = encode_dataset(vres.loaded, data, lat / "latents.safetensors", seed=lcfg.seed)
    enc_s = time.perf_counter() - t0
    check_unet_fits(lcfg, cache.latent_shape)
    _atomic_write_json(lat / "latent.json", {
        "format": LATENT_RUN_FORMAT, "vae_checkpoint": "vae/vae.json", "vae_hash": vres.loaded.hash,
        "latent_shape": list(cache.latent_shape), "image_shape": list(data.shape), "scale_factor": cache.scale,
        "latent_cache": "latents.safetensors", "encode_mode": "mean", "unet_run": "unet",
        "data": {"spec": "digits", "image_size": 8, "bins": data.bins}, "vae_metrics": vres.metrics,
    })
    t = _train_for_budget(lcfg, lat / "unet", cache.data(), budget_s)
    x, li = sample_latent(lat, lat, sampler=sampler, steps=steps, num_samples=num_samples, device=device, progress=progress)
    ml = evaluate_latent(lat, device=device, progress=progress)
    result["latent"] = {**t, "sample_s": li["seconds"], "sample_latent_s": li["seconds_latent"],
                        "decode_s": li["seconds_decode"], "params": _params(lat / "unet"),
                        "vae_params": sum(p.numel() for p in vres.loaded.vae.parameters()),
                        "data_shape": list(cache.latent_shape), "channel_mult": list(lcfg.channel_mult),
                        "scale_factor": cache.scale, "vae_train_s": round(vae_s, 2), "vae_steps": vc.steps,
                        "encode_s": round(enc_s, 2), "vae": vres.metrics, "metrics": _headline(ml)}

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
    _atomic_write_json(out / "comparison.json", result)
    _atomic_write_bytes(out / "comparison.md", (comparison_table(result) + "\n").encode())
    return result


def _pixel_demo_config() -> dict:
    """The pixel demo's recipe, ``diffmath.train.DEMO_CONFIG`` (a copy)."""
    from .train import DEMO_CONFIG

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
        return (f"| {name} | {shape} | {params} | {steps} | {sps} | {samp} | {m['mean_confidence']:.3f} | "
                f"{m['classes_present']}/10 | {abs(m['class_entropy_bits']):.2f} | {m['frechet_distance']:.2f} |")

    L = [
        f"Digits 8x8, diffusion training budget {r['budget_s']:.0f} s wall clock each on {r['device']} "
        f"({r['threads']} torch threads, {r['cpus']} CPUs visible); {r['num_samples']} samples with "
        f"{r['sampler']} ({r['sampler_steps']} steps); metrics from diffmath.evaluate.",
        "",
        "| model | diffused shape | U-Net params | steps in budget | s / step | sampling (s) | classifier confidence "
        "| classes | class entropy (bits) | Fréchet distance |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("pixel U-Net", "x".join(map(str, p["data_shape"])), f"{p['params']:,}", p["steps"], f"{p['s_per_step']:.3f}",
            f"{p['sample_s']:.1f}", p["metrics"]),
        row("latent U-Net + VAE decoder", "x".join(map(str, lt["data_shape"])), f"{lt['params']:,}", lt["steps"],
            f"{lt['s_per_step']:.3f}", f"{lt['sample_s']:.1f} (decode {lt['decode_s']:.2f})", lt["metrics"]),
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
