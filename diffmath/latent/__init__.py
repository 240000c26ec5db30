"""Latent diffusion (Rombach et al. 2022): a VAE, and the same diffusion in its latent space.

The public API of latent diffusion, one module per concept (import from the package or from the
module; each module imports only those before it in this list, and its docstring holds the
equations):

- ``vae_math``: the VAE's objective, pure functions of a ``diffmath.nn.vae.VAE`` with a Gaussian
  posterior and a decoder discretised onto the data's grid: the loss
  -E_q[log p(x | z)] + beta KL(q || N(0, I)) (Kingma & Welling 2014, ``vae_loss``), ``elbo`` in
  bits/dim, ``iwae_bound`` (Burda et al. 2016).
- ``vae_config``: a VAE training run's configuration (``VAEConfig``, ``VAE_DEMO_CONFIG``).
- ``vae_checkpoint``: VAE checkpoints (``save_vae``/``load_vae``, ``vae_hash``, ``LoadedVAE``).
- ``vae_train``: VAE training (``train_vae``) and its shape check (``check_vae_fits``).
- ``cache``: the data encoded once (``encode_dataset``, ``load_latents``, ``LatentCache``) with the
  scaling factor 1 / std(z) (Rombach et al., Sec. 4.3.2; ``scale_factor``), and ``decode_latents``.
- ``run``: a latent run directory (its layout is in that module's docstring) and its record
  latent.json (``read_latent_run``, ``write_latent_run``).
- ``diffusion``: the pixel pipeline's U-Net, schedule and training loop on the scaled latents
  (``train_latent``), sampling and decoding (``sample_latent``) and the pixel pipeline's metrics
  of the decoded samples (``evaluate_latent``, ``evaluate_guidance_latent``).
- ``demo``: the latent demo (``demo_latent``).
- ``compare``: pixel vs latent diffusion at an equal training budget (``compare_pixel_latent``,
  ``comparison_table``).

No file is ever unpickled: weights are safetensors, metadata JSON; the latent cache and every
checkpoint are verified against the SHA-256 in their JSON sidecars.
"""

from __future__ import annotations

from . import cache, compare, demo, diffusion, run, vae_checkpoint, vae_config, vae_math, vae_train
from .cache import *  # noqa: F403  (each module's __all__ is its public API)
from .compare import *  # noqa: F403
from .demo import *  # noqa: F403
from .diffusion import *  # noqa: F403
from .run import *  # noqa: F403
from .vae_checkpoint import *  # noqa: F403
from .vae_config import *  # noqa: F403
from .vae_math import *  # noqa: F403
from .vae_train import *  # noqa: F403

__all__ = [
    name
    for module in (vae_math, vae_config, vae_checkpoint, vae_train, cache, run, diffusion, demo, compare)
    for name in module.__all__
]
