"""The DDPM U-Net (Ho et al. 2020, App. B; as refined in Improved DDPM / guided-diffusion).

A wide-ResNet U-Net on images of shape (B, C, H, W):

- the timestep t (integer index, or a float for continuous-time queries) is embedded with
  the Transformer sinusoidal embedding and a 2-layer MLP (``timestep_embedding``);
- each resolution holds ``num_res_blocks`` residual blocks ``GroupNorm -> SiLU -> conv3x3
  -> + Linear(SiLU(temb)) -> GroupNorm -> SiLU -> dropout -> conv3x3`` plus a skip;
- multi-head self-attention follows each block at the resolutions in
  ``attention_resolutions`` and in the middle;
- down-sampling by a stride-2 conv, up-sampling by nearest + conv3x3, skip connections
  concatenated on the way up.

The network predicts eps, x0 or v (the caller decides what the output means); with
``learn_sigma=True`` it outputs 2C channels, the second half a value v in [-1, 1] that
``diffmath.losses.learned_range_log_variance`` turns into the log variance (Improved DDPM
eq. 15). The last conv of every residual branch and the output conv start at zero, so the
untrained network is the identity on its skips and outputs 0.

With ``num_classes = K > 0`` the network is class-conditional: a learned embedding of the
label y in [0, K] (K the "null" class: the unconditional model) is added to the time
embedding, temb = MLP(sinusoid(t)) + E[y] (Ho & Salimans 2022; guided-diffusion's
``label_emb``). ``num_classes = 0`` (the default) builds exactly the unconditional network:
the same parameters, state_dict keys, initial values and outputs.

Imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._labels import check_num_classes, class_embedding, class_labels

__all__ = ["UNet", "timestep_embedding", "num_groups_for"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (Vaswani et al. 2017; DDPM App. B):

    emb[:, i] = cos(t * f_i), emb[:, dim/2 + i] = sin(t * f_i),  f_i = max_period^(-i / (dim/2)).

    t: (B,) integer or float timesteps. Returns float32 (B, dim) (a zero column pads odd dim).
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,); got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def num_groups_for(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The GroupNorm group count: the largest divisor of ``channels`` that is <= max_groups
    and leaves >= ``min_group_size`` channels per group (32 groups at DDPM's widths >= 128).

    One channel per group would be instance norm, which removes any per-channel constant --
    including the time embedding added just before ``norm2`` in ``ResBlock``.
    """
    for g in range(min(max_groups, max(1, channels // min_group_size)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = conv(dropout(SiLU(GN(conv(SiLU(GN(x))) + W temb)))); out = skip(x) + h."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int):
        super().__init__()
        heads = max(1, min(num_heads, ch))
        while ch % heads:
            heads -= 1
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        # (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM U-Net.

    in_channels: image channels C. channels: base width. channel_mult: width multiplier per
    resolution (one down-sampling between consecutive entries, so image_size must be divisible
    by 2**(len(channel_mult) - 1)). num_res_blocks: residual blocks per resolution (the up path
    has one more, as DDPM). attention_resolutions: spatial sizes (e.g. (4, 2)) that get
    self-attention. learn_sigma: output 2C channels (eps/x0/v, then the variance value v).
    num_classes: K > 0 makes it class-conditional (module docstring), 0 unconditional.
    forward(x (B, C, H, W), t (B,) int or float, y=None) -> (B, C or 2C, H, W); y: class labels
    (int or (B,)) in [0, K], None meaning the null class K.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4,),
        dropout: float = 0.1,
        num_heads: int = 4,
        image_size: int = 8,
        learn_sigma: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if in_channels < 1 or channels < 1 or num_res_blocks < 1 or not channel_mult:
            raise ValueError(
                f"in_channels, channels and num_res_blocks must be >= 1 and channel_mult non-empty; got "
                f"{in_channels}, {channels}, {num_res_blocks}, {tuple(channel_mult)}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        levels = len(channel_mult)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size must be divisible by 2**(len(channel_mult) - 1) = {2 ** (levels - 1)}; got {image_size}"
            )
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        self.image_size = image_size
        self.model_channels = channels
        temb_ch = 4 * channels
        self.temb = nn.Sequential(nn.Linear(channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [channels]
        ch, res = channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, temb_ch, dropout)]
                ch = channels * mult
                if res in attention_resolutions:
                    blocks.append(AttnBlock(ch, num_heads))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, temb_ch, dropout), AttnBlock(ch, num_heads), ResBlock(ch, ch, temb_ch, dropout)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), channels * mult, temb_ch, dropout)]
                ch = channels * mult
                if res in attention_resolutions:
                    blocks.append(AttnBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(blocks))

        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        # built last, so that every other parameter draws the same initial values as the
        # unconditional network's under the same seed; none at all for num_classes = 0
        self.num_classes = num_classes
        if num_classes:
            self.class_emb = class_embedding(num_classes, temb_ch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
        y = class_labels(y, self.num_classes, x.shape[0], x.device)
        temb = self.temb(timestep_embedding(t, self.model_channels).to(x.dtype))
        if y is not None:
            temb = temb + self.class_emb(y).to(temb.dtype)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            for b in blocks:
                h = b(h, temb) if isinstance(b, ResBlock) else b(h)
            hs.append(h)
        for b in self.mid:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for b in blocks:
                h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return self.conv_out(F.silu(self.norm_out(h)))
