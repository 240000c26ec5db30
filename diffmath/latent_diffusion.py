"""Compatibility module: latent diffusion runs live in ``diffmath.latent`` (``diffusion``, ``run``,
``demo``); import them from there."""

from .latent import demo, diffusion, run
from .latent.demo import *  # noqa: F403
from .latent.diffusion import *  # noqa: F403
from .latent.run import *  # noqa: F403

__all__ = [name for module in (diffusion, run, demo) for name in module.__all__]
