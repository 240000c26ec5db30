"""Compatibility module: the latent cache lives in ``diffmath.latent.cache``; import it from there."""

from .latent.cache import *  # noqa: F403
from .latent.cache import __all__  # noqa: F401
