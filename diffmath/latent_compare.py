"""Compatibility module: the pixel vs latent comparison lives in ``diffmath.latent.compare``;
import it from there."""

from .latent.compare import *  # noqa: F403
from .latent.compare import __all__  # noqa: F401
