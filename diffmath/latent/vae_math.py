"""The VAE of latent diffusion (Rombach et al. 2022): its objective, configuration, checkpoints
and training. The architecture is ``diffmath.nn.vae.VAE``; ``diffmath.latent`` gives the overview.

The VAE has a diagonal Gaussian posterior q_phi(z | x) = N(mu_phi(x), diag(sigma_phi(x)^2)), the
prior p(z) = N(0, I) and a Gaussian decoder N(m_theta(z), s_theta(z)^2) per pixel, *discretised
onto the data's grid*: for data on ``bins`` levels in [-1, 1] (17 for the 8x8 digits, 256 for
8-bit images) p_theta(x | z) is the probability of x's bin,
``gaussian.discretized_gaussian_log_likelihood(x, m, log s, bins)`` (DDPM eq. 13 with exact normal
CDFs), so log p_theta(x | z) <= 0 and the ELBO is a bound on a true log-probability of the
discrete data. It is trained on

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

Checkpoints: ``vae.safetensors`` (weights ``vae.*``) + ``vae.json`` (config, ``vae_hash``,
SHA-256 of the weights file); nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_json, read_sidecar, safetensors_metadata, save_safetensors, weights_and_sidecar
from ..data import Data, load_data
from ..gaussian import discretized_gaussian_log_likelihood, normal_kl, normal_log_prob
from ..losses import LN2
from ..nn.vae import VAE

__all__ = [
    "VAEConfig",
    "VAEResult",
    "LoadedVAE",
    "VAE_FORMAT",
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
    "check_vae_fits",
]

VAE_FORMAT = "diffmath.vae/1"


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
        from ..train import MAX_SEED, check_bool_fields, check_int_fields, int_tuple_field

        self.channel_mult = int_tuple_field(self, "channel_mult")
        check_bool_fields(self, ("progress",))

        check_int_fields(self, ("image_size", "channels", "latent_channels", "num_res_blocks", "steps", "batch_size",
                                "elbo_samples"), 1, "a positive integer")
        check_int_fields(self, ("warmup", "seed"), 0)
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must lie in [0, 2**63 - 1] = [0, {MAX_SEED}] (torch's seed range); got seed = {self.seed}")
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
        from ..train import config_from_dict

        return config_from_dict(cls, d, "VAE config")


VAE_DEMO_CONFIG = dict(data="digits", image_size=8, steps=1500, batch_size=128, lr=2e-3, beta=1.0, seed=0)


# ============================================================================= checkpoints
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


def save_vae(out, vae: VAE, *, config: VAEConfig | None = None, bins: int | None = None, extra: dict | None = None) -> Path:
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
    meta = {**meta, "weights": "vae.safetensors", "weights_sha256": digest, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
        raise FileNotFoundError(f"VAE checkpoint {str(st)!r} does not exist (give a folder with vae.json, or the .json/.safetensors)")
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
        raise ValueError(f"{where!r} lacks the key 'vae_hash' (the SHA-256 of the VAE's config and weights), so the "
                         "weights cannot be verified")
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
        raise ValueError(f"{str(st)!r}: the weights hash to {h[:16]}... but the checkpoint says {meta['vae_hash'][:16]}...")
    vae.to(_device(device)).eval()
    return LoadedVAE(vae, meta, h, js if js.exists() else st, meta.get("bins"))


def as_loaded(vae, device="cpu") -> LoadedVAE:
    if isinstance(vae, LoadedVAE):
        return vae
    if isinstance(vae, VAE):
        return LoadedVAE(vae.eval(), {"model": vae.config()}, vae_hash(vae), None, None)
    return load_vae(vae, device)


def _device(name) -> torch.device:
    if isinstance(name, torch.device):
        return name
    from ..distributed import resolve_device

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
    from ..train import lr_schedule

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
    from ..rundir import open_run

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
    from ..sample import save_grid

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
    metrics.update({
        "held_out_images": int(n),
        "elbo_samples": config.elbo_samples,
        "train_seconds": round(train_s, 2),
        "steps": config.steps,
        "final_train_elbo_bpd": float(np.mean(hist[-50:])) if hist else None,
    })
    ck = save_vae(out, vae, config=config, bins=data.bins,
                  extra={"data": {"name": data.name, "shape": list(data.shape), "bins": data.bins,
                                  "train": int(N), "held_out": int(n)}, "metrics": metrics, "step": config.steps})
    if n:
        k = min(16, n)
        save_grid(out / "recon.png", np.concatenate([data.held_out[:k], recon[:k].numpy()]), nrow=k,
                  title="held-out digits (top) and their reconstructions (bottom)")
    return VAEResult(out, ck, load_vae(ck, dev), hist, metrics, time.time() - t0)


