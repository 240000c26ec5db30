"""A small MLP denoiser for low-dimensional toy data (swiss roll, Gaussian mixtures).

out = Linear(SiLU(... Linear(SiLU(W x + U temb)) ...)), where temb is the sinusoidal
embedding of t (``timestep_embedding``) passed through a 2-layer MLP and added to every
hidden layer, as the U-Net's residual blocks do. Predicts eps, x0 or v; with
``learn_sigma=True`` it outputs 2*dim values (the second half the Improved DDPM variance
value v in [-1, 1]).

With ``num_classes = K > 0`` it is class-conditional (for a Gaussian mixture: the component
as the label): a learned embedding E[y] of y in [0, K] (K the null class) is added to the
time embedding before its SiLU, as in the U-Net. ``num_classes = 0`` (the default) is exactly
the unconditional network (same parameters, initial values and outputs).

Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._labels import check_num_classes, class_embedding, class_labels
from .unet import timestep_embedding

__all__ = ["MLPDenoiser"]


class MLPDenoiser(nn.Module):
    """forward(x (B, dim), t (B,), y=None) -> (B, dim) or (B, 2*dim) with ``learn_sigma``;
    y: class labels (int or (B,)) in [0, num_classes], None meaning the null class."""

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 64,
        learn_sigma: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if dim < 1 or hidden < 1 or depth < 1 or time_dim < 2:
            raise ValueError(
                f"dim, hidden, depth must be >= 1 and time_dim >= 2; got {dim}, {hidden}, {depth}, {time_dim}"
            )
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
        # built last: the other parameters draw the unconditional network's initial values
        self.num_classes = num_classes
        if num_classes:
            self.class_emb = class_embedding(num_classes, hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}); got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
        y = class_labels(y, self.num_classes, x.shape[0], x.device)
        temb = self.temb(timestep_embedding(t, self.time_dim).to(x.dtype))
        if y is not None:
            temb = temb + self.class_emb(y).to(temb.dtype)
        temb = F.silu(temb)
        h = self.inp(x)
        for lin, tp in zip(self.layers, self.tproj):
            h = h + lin(F.silu(h + tp(temb)))
        return self.out(F.silu(h))
