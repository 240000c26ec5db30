"""A small MLP denoiser for low-dimensional toy data (swiss roll, Gaussian mixtures).

out = Linear(SiLU(... Linear(SiLU(W x + U temb)) ...)), where temb is the sinusoidal
embedding of t (``timestep_embedding``) passed through a 2-layer MLP and added to every
hidden layer, as the U-Net's residual blocks do. Predicts eps, x0 or v; with
``learn_sigma=True`` it outputs 2*dim values (the second half the Improved DDPM variance
value v in [-1, 1]).

Imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .unet import timestep_embedding

__all__ = ["MLPDenoiser"]


class MLPDenoiser(nn.Module):
    """forward(x (B, dim), t (B,)) -> (B, dim) or (B, 2*dim) with ``learn_sigma``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 64, learn_sigma: bool = False):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or time_dim < 2:
            raise ValueError(f"dim, hidden, depth must be >= 1 and time_dim >= 2; got {dim}, {hidden}, {depth}, {time_dim}")
        self.dim = dim
        self.in_channels = dim
        self.learn_sigma = learn_sigma
        self.out_channels = dim * (2 if learn_sigma else 1)
        self.time_dim = time_dim
        self.temb = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.tproj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, self.out_channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}); got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
        temb = F.silu(self.temb(timestep_embedding(t, self.time_dim).to(x.dtype)))
        h = self.inp(x)
        for lin, tp in zip(self.layers, self.tproj):
            h = h + lin(F.silu(h + tp(temb)))
        return self.out(F.silu(h))
