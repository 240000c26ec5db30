"""Latent diffusion (Rombach et al. 2022): a VAE, and the same diffusion in its latent space.

The public API of latent diffusion, re-exported from one module per concept (import from either;
each module imports only those before it in this list, and its docstring holds the equations):

- ``diffmath.latent_vae``: the VAE (``diffmath.nn.vae.VAE``) with a Gaussian posterior and a
  decoder discretised onto the data's grid; its loss -E_q[log p(x | z)] + beta KL(q || N(0, I))
  (Kingma & Welling 2014), ``elbo`` in bits/dim, ``iwae_bound`` (Burda et al. 2016), its
  configuration (``VAEConfig``), checkpoints (``save_vae``/``load_vae``, ``vae_hash``) and
  training (``train_vae``).
- ``diffmath.latent_cache``: the data encoded once (``encode_dataset``, ``load_latents``,
  ``LatentCache``) with the scaling factor 1 / std(z) (Rombach et al., Sec. 4.3.2;
  ``scale_factor``), and ``decode_latents``.
- ``diffmath.latent_diffusion``: a latent run directory (its layout is in that module's
  docstring): the pixel pipeline's U-Net, schedule and training loop on the scaled latents
  (``train_latent``), sampling and decoding (``sample_latent``), the pixel pipeline's metrics of
  the decoded samples (``evaluate_latent``) and the demo (``demo_latent``).
- ``diffmath.latent_compare``: pixel vs latent diffusion at an equal training budget
  (``compare_pixel_latent``, ``comparison_table``).

No file is ever unpickled: weights are safetensors, metadata JSON; the latent cache and every
checkpoint are verified against the SHA-256 in their JSON sidecars.
"""

from __future__ import annotations

from .cache import (
    LATENTS_FORMAT,
    LatentCache,
    LatentCacheError,
    decode_latents,
    encode_dataset,
    load_latents,
    scale_factor,
)
from .compare import compare_pixel_latent, comparison_table
from .diffusion import (
    LATENT_DEMO_CONFIG,
    LATENT_RUN_FORMAT,
    LatentResult,
    check_unet_fits,
    demo_latent,
    evaluate_guidance_latent,
    evaluate_latent,
    read_latent_run,
    sample_latent,
    train_latent,
)
from .vae_math import (
    LN2,
    VAE_DEMO_CONFIG,
    VAE_FORMAT,
    LoadedVAE,
    VAEConfig,
    VAEResult,
    check_vae_fits,
    elbo,
    iwae_bound,
    kl_to_standard_normal,
    load_vae,
    reconstruction_log_likelihood,
    save_vae,
    train_vae,
    vae_hash,
    vae_loss,
)

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
    "evaluate_guidance_latent",
    "decode_latents",
    "read_latent_run",
    "check_vae_fits",
    "check_unet_fits",
    "demo_latent",
    "compare_pixel_latent",
    "comparison_table",
]
