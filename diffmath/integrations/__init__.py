"""Bridges from diffmath to other libraries, each an optional extra.

``diffmath.integrations.diffusers`` (``pip install diffmath[diffusers]``): drop-in diffusers
schedulers (``DDPMScheduler``, ``DDIMScheduler``) whose arithmetic is diffmath's float64
core. Importing ``diffmath`` or this package imports no third-party bridge; import the
submodule itself to load diffusers.
"""
