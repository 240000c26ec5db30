"""Denoising networks (torch only): the DDPM U-Net and a small MLP for 2-D toy data."""

from .mlp import MLPDenoiser
from .unet import UNet, timestep_embedding

__all__ = ["UNet", "MLPDenoiser", "timestep_embedding"]
