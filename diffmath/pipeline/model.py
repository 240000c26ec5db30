"""The denoiser a run trains and its noise schedule, built from a ``TrainConfig``: a U-Net for
images (C, H, W), an MLP for vectors (D,) (``diffmath.nn``), with the checks that refuse a
configuration the data cannot take before any work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..schedules import Schedule, named_schedule
from .config import TrainConfig
from .data import Data


def make_schedule(config: TrainConfig) -> Schedule:
    return named_schedule(config.schedule, config.timesteps)


def build_model(config: TrainConfig, data_shape) -> torch.nn.Module:
    """A U-Net for image data (C, H, W), an MLP for vectors (D,)."""
    from ..nn import MLPDenoiser, UNet

    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) == 3:
        C, H, W = data_shape
        if H != W:
            raise ValueError(f"images must be square; got {H}x{W}")
        return UNet(
            in_channels=C,
            channels=config.channels,
            channel_mult=config.channel_mult,
            num_res_blocks=config.num_res_blocks,
            attention_resolutions=config.attention_resolutions,
            dropout=config.dropout,
            num_heads=config.num_heads,
            image_size=H,
            learn_sigma=config.learn_sigma,
            num_classes=config.num_classes,
        )
    if len(data_shape) == 1:
        return MLPDenoiser(
            dim=data_shape[0],
            hidden=config.channels * 4,
            depth=config.mlp_depth,
            learn_sigma=config.learn_sigma,
            num_classes=config.num_classes,
        )
    raise ValueError(f"data samples must have shape (C, H, W) or (D,); got {data_shape}")


def resolve_classes(config: TrainConfig, data: Data) -> TrainConfig:
    """The config of a run on ``data``: unchanged for an unconditional run; for a conditional
    one, ``num_classes`` and ``class_names`` filled in from the data's labels (``Data.class_names``).
    ``ValueError`` before any work if the data have no labels (the swiss roll; a folder that is
    not an ImageFolder layout), fewer than 2 classes, or classes other than the config's."""
    if not config.conditional:
        return config
    if data.labels_train is None or not data.class_names:
        why = data.info.get("no_labels") if isinstance(data.info, dict) else None
        raise ValueError(
            f"--conditional needs class labels, and the data {data.name!r} have none"
            + (f": {why}" if why else " (the digits, gmm and folders of class sub-folders have them)")
        )
    names = tuple(str(c) for c in data.class_names)
    K = len(names)
    if K < 2:
        raise ValueError(
            f"--conditional needs at least 2 classes; the data {data.name!r} have {K} ({list(names)}): "
            "add a sub-folder per class (root/<class>/<image>)"
        )
    labels = np.asarray(data.labels_train)
    if labels.shape != (len(data.train),) or (labels.size and (labels.min() < 0 or labels.max() >= K)):
        raise ValueError(f"the labels of {data.name!r} must be (N,) integers in [0, {K}); got shape {labels.shape}")
    if config.num_classes not in (0, K) or (config.class_names and tuple(config.class_names) != names):
        raise ValueError(
            f"the config names {config.num_classes} classes {list(config.class_names)} but the data "
            f"{data.name!r} have {K}: {list(names)}"
        )
    return dataclasses.replace(config, num_classes=K, class_names=names)


def unet_resolutions(config: TrainConfig, image_size: int) -> tuple:
    """The spatial sizes of the U-Net's levels: image_size / 2**l for each entry l of channel_mult."""
    return tuple(image_size // 2**level for level in range(len(config.channel_mult)))


def check_model_config(config: TrainConfig, data_shape, *, strict: bool = True) -> None:
    """``ValueError`` before any work if the U-Net of ``config`` cannot be built for images of
    ``data_shape`` (C, H, W) as asked: a side not divisible by its down-sampling, or an attention
    resolution it never has (the message names the ones it has). The default attention
    resolution 4, which a U-Net without a 4x4 level lacks, is dropped with a warning instead;
    ``strict=False`` (a resumed run, whose config is fixed) warns for any resolution. Vectors
    (toy data, an MLP) have no resolutions to check."""
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) != 3:
        return
    C, H, W = data_shape
    if H != W:
        raise ValueError(f"images must be square; got {H}x{W}")
    f = 2 ** (len(config.channel_mult) - 1)
    if H % f:
        raise ValueError(
            f"the U-Net down-samples by {f} (channel_mult = {list(config.channel_mult)}), so the image side "
            f"must be divisible by {f}; got {H}x{W}. Use fewer channel_mult entries or another --image-size"
        )
    levels = unet_resolutions(config, H)
    missing = [r for r in config.attention_resolutions if r not in levels]
    if not missing:
        return
    default = TrainConfig.__dataclass_fields__["attention_resolutions"].default
    msg = (
        f"attention_resolutions {list(config.attention_resolutions)}: the U-Net for {H}x{W} images with channel_mult "
        f"{list(config.channel_mult)} has the resolutions {list(levels)} only, so {missing} would never get "
        f"attention; choose among {list(levels)} (or [] for attention only in the middle block)"
    )
    if strict and tuple(config.attention_resolutions) != tuple(default):
        raise ValueError(msg)
    import warnings

    warnings.warn(msg, UserWarning, stacklevel=3)
