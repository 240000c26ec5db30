"""Class labels for the conditional denoisers (``UNet``, ``MLPDenoiser`` with ``num_classes > 0``).

A conditional network adds a learned class embedding to its time embedding (Ho & Salimans
2022, "Classifier-free diffusion guidance"; as guided-diffusion's ``label_emb`` and diffusers'
``class_embedding``): temb = MLP(sinusoid(t)) + E[y], with E an ``nn.Embedding(num_classes + 1,
dim)``. Row ``num_classes`` is the "null" class, the unconditional model that label dropout
trains (``diffmath.guidance.drop_labels``) and classifier-free guidance queries
(``diffmath.guidance.guided``).

Imports only torch.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["check_num_classes", "class_embedding", "class_labels"]


def check_num_classes(num_classes) -> int:
    """``num_classes`` as an int >= 0 (0: an unconditional network, no class embedding)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an integer >= 0 (0: unconditional); got {num_classes!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: unconditional); got num_classes = {int(num_classes)}")
    return int(num_classes)


def class_embedding(num_classes: int, dim: int) -> nn.Embedding:
    """E: (num_classes + 1, dim), N(0, 1) init (torch's default, as guided-diffusion); the last
    row is the null class."""
    return nn.Embedding(num_classes + 1, dim)


def class_labels(y, num_classes: int, batch: int, device) -> torch.Tensor | None:
    """The labels of a forward pass as an int64 tensor (batch,) on ``device``.

    y: None (the null class ``num_classes`` for every sample of a conditional network; None
    for an unconditional one), a python int, or an integer array/tensor of shape () or (batch,),
    each value in [0, num_classes] (``num_classes`` itself is the null class). Labels given to
    an unconditional network (``num_classes = 0``) raise ValueError.
    """
    if num_classes == 0:
        if y is not None:
            raise ValueError(
                "y (class labels) was given to an unconditional network (num_classes = 0); build it with "
                "num_classes >= 1 or call it without y"
            )
        return None
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if isinstance(y, bool) or (not isinstance(y, numbers.Integral) and isinstance(y, numbers.Number)):
        raise TypeError(f"y must be an integer class label or an integer array of shape (B,); got {y!r}")
    yt = torch.as_tensor(y, device=device)
    if yt.is_floating_point() or yt.is_complex() or yt.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels; got dtype {yt.dtype}")
    if yt.ndim == 0:
        yt = yt.expand(batch)
    if tuple(yt.shape) != (batch,):
        raise ValueError(f"y must be an int or have shape (B,) = ({batch},); got shape {tuple(yt.shape)}")
    if batch:
        lo, hi = int(yt.min()), int(yt.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"y must lie in [0, {num_classes}] ({num_classes} classes; {num_classes} is the null class); "
                f"got y = {lo if lo < 0 else hi}"
            )
    return yt.to(torch.long)
