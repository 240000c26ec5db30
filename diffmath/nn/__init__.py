"""Networks (torch only): the DDPM U-Net and a small MLP for 2-D toy data (the denoisers), and
the VAE of latent diffusion (``diffmath.latent``)."""

from .mlp import MLPDenoiser
from .unet import UNet, timestep_embedding
from .vae import VAE

__all__ = ["UNet", "MLPDenoiser", "VAE", "timestep_embedding"]
