"""Compatibility module: the VAE's code lives in ``diffmath.latent`` (``vae_math``, ``vae_config``,
``vae_checkpoint``, ``vae_train``); import it from there."""

from .latent import vae_checkpoint, vae_config, vae_math, vae_train
from .latent.vae_checkpoint import *  # noqa: F403
from .latent.vae_config import *  # noqa: F403
from .latent.vae_math import *  # noqa: F403
from .latent.vae_train import *  # noqa: F403

__all__ = [name for module in (vae_math, vae_config, vae_checkpoint, vae_train) for name in module.__all__]
