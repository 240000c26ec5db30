"""A convolutional variational autoencoder (Kingma & Welling 2014), the first stage of latent
diffusion (Rombach et al. 2022, "High-resolution image synthesis with latent diffusion models",
Sec. 3.1, the KL-regularised autoencoder).

Architecture only (the loss, the ELBO and training live in ``diffmath.latent``):

- encoder  x (B, C, H, W) -> conv3x3 -> per level: ``num_res_blocks`` residual blocks
  (GroupNorm -> SiLU -> conv3x3, twice, plus a skip), a stride-2 conv between levels ->
  a middle residual block -> GroupNorm -> SiLU -> conv3x3 to 2 * latent_channels: the mean
  and the log-variance of the diagonal Gaussian posterior q_phi(z | x), z of shape
  (B, latent_channels, H / f, W / f) with the down-sampling factor f = 2 ** (len(channel_mult) - 1);
- reparameterisation  z = mean + exp(logvar / 2) * noise,  noise ~ N(0, I)  (Kingma & Welling
  2014, Sec. 2.4), with the noise passed in (no hidden RNG);
- decoder  z -> the mirror image (nearest-neighbour up-sampling + conv3x3 between levels) ->
  2 * C channels: the mean and the log standard deviation (``log_scale``) of the Gaussian
  decoder p_theta(x | z), which ``diffmath.latent`` discretises onto the data's grid.

The log-variance and the log-scale are bounded softly to [LOGVAR_MIN, LOGVAR_MAX] and
[LOG_SCALE_MIN, +inf) (a smooth floor, so no gradient is ever cut off): exp() can neither
overflow nor underflow to a zero variance.

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VAE", "LOGVAR_MIN", "LOGVAR_MAX", "LOG_SCALE_MIN"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # as Rombach et al.'s DiagonalGaussianDistribution (there a hard clamp)
LOG_SCALE_MIN = -9.0  # decoder sigma >= ~1.2e-4, far below the 17- and 256-level bin widths


def _groups(ch: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    for g in range(min(max_groups, max(1, ch // min_group_size)), 0, -1):
        if ch % g == 0:
            return g
    return 1


def _soft_floor(x: torch.Tensor, lo: float) -> torch.Tensor:
    """lo + softplus(x - lo): ~x for x >> lo, never below lo, smooth."""
    return lo + F.softplus(x - lo)


def _soft_range(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """A smooth clamp to [lo, hi]: lo + softplus(x - lo), then hi - softplus(hi - .)."""
    return hi - F.softplus(hi - _soft_floor(x, lo))


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(cin), cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.n2 = nn.GroupNorm(_groups(cout), cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class VAE(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior and a Gaussian decoder.

    in_channels: image channels C. image_size: the side H = W of the images it accepts (must
    be divisible by the down-sampling factor f = 2 ** (len(channel_mult) - 1)). channels: base
    width; channel_mult: width multiplier per resolution (one halving between consecutive
    entries). latent_channels: channels of z. num_res_blocks: residual blocks per level.

    ``encode(x) -> (mean, logvar)`` of q(z | x), each (B, latent_channels, H/f, W/f);
    ``reparameterize(mean, logvar, noise) -> z``; ``decode(z) -> (mean, log_scale)`` of
    p(x | z), each (B, C, H, W); ``forward(x, noise) -> (z, post_mean, post_logvar,
    dec_mean, dec_log_scale)``. ``config()`` returns the constructor arguments (JSON-able).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        latent_channels: int = 2,
        num_res_blocks: int = 1,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        for name, v in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("channels", channels),
            ("latent_channels", latent_channels),
            ("num_res_blocks", num_res_blocks),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {name} = {v!r}")
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers; got {channel_mult}")
        f = 2 ** (len(channel_mult) - 1)
        if image_size % f:
            raise ValueError(
                f"image_size must be divisible by the VAE's down-sampling factor 2**(len(channel_mult) - 1) = {f}; "
                f"got image_size = {image_size} (channel_mult = {channel_mult})"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        self.channels = channels
        self.channel_mult = channel_mult
        self.latent_channels = latent_channels
        self.num_res_blocks = num_res_blocks
        self.factor = f

        # encoder
        enc = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                enc.append(_Res(ch, channels * mult))
                ch = channels * mult
            if level != len(channel_mult) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [
            _Res(ch, ch),
            nn.GroupNorm(_groups(ch), ch),
            nn.SiLU(),
            nn.Conv2d(ch, 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        # decoder (the mirror image)
        dec = [nn.Conv2d(latent_channels, ch, 3, padding=1), _Res(ch, ch)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                dec.append(_Res(ch, channels * mult))
                ch = channels * mult
            if level:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, 2 * in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    # ------------------------------------------------------------------ shapes
    @property
    def latent_shape(self) -> tuple:
        """The shape of one latent z: (latent_channels, H / f, W / f)."""
        s = self.image_size // self.factor
        return (self.latent_channels, s, s)

    @property
    def image_shape(self) -> tuple:
        return (self.in_channels, self.image_size, self.image_size)

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "channels": self.channels,
            "channel_mult": list(self.channel_mult),
            "latent_channels": self.latent_channels,
            "num_res_blocks": self.num_res_blocks,
        }

    def _check(self, x: torch.Tensor, shape: tuple, what: str):
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{what} must have shape (B, {', '.join(map(str, shape))}); got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating tensor; got dtype {x.dtype}")

    # ------------------------------------------------------------------ the maps
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_phi(z | x) = N(mean, diag(exp(logvar)))."""
        self._check(x, self.image_shape, "x")
        h = self.encoder(x)
        mean, logvar = h.chunk(2, dim=1)
        return mean, _soft_range(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * noise (Kingma & Welling 2014, eq. 10)."""
        if noise.shape != mean.shape:
            raise ValueError(f"noise must have the posterior's shape {tuple(mean.shape)}; got {tuple(noise.shape)}")
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_theta(x | z) = N(mean, exp(2 log_scale)) per pixel (discretised by the caller)."""
        self._check(z, self.latent_shape, "z")
        h = self.decoder(z)
        mean, log_scale = h.chunk(2, dim=1)
        return mean, _soft_floor(log_scale, LOG_SCALE_MIN)

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        mean, logvar = self.encode(x)
        z = self.reparameterize(mean, logvar, noise)
        dmean, dlog_scale = self.decode(z)
        return z, mean, logvar, dmean, dlog_scale
