"""The network of a trained run, ready to sample: ``load_model`` reads a checkpoint (its weights
checked against the SHA-256 of its sidecar) into a ``LoadedModel``, whose ``forward`` runs the
network at the requested precision, ``eps_model`` turns its prediction (eps, x0 or v) into eps,
and ``guided_eps`` is the classifier-free guided eps of a conditional request (``conditioned``;
the module docstring of ``diffmath.pipeline.generate``, "Classes and guidance").

Precision (``--dtype``): the sampling state x stays float32 whatever the network's precision;
``dtype="bf16"``/``"fp16"`` runs the U-Net under ``torch.autocast`` in bfloat16/float16 (CPU or
CUDA), its output read back as float32 before each update (docs/samplers.md, "Precision of the
loop state"); ``"fp32"`` runs it in float32. ``dtype=None`` (the library default) keeps the
loaded model's own rule: bf16 autocast on CUDA for a run trained with bf16, float32 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..schedules import Schedule

__all__ = ["LoadedModel", "load_model", "NET_DTYPES"]

#: ``--dtype``: the U-Net's autocast precision (the sampling state stays float32)
NET_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: TrainConfig  # noqa: F821
    schedule: Schedule
    data_shape: tuple
    bins: int | None
    step: int
    device: torch.device
    checkpoint: Path
    dtype: str | None = None  # a NET_DTYPES key; None: bf16 autocast on CUDA for a run trained with bf16
    # classifier-free guidance of a conditional run (``conditioned``): the requested class of
    # each sample of the batch, the scale s and the rescale phi; labels None: no labels
    labels: torch.Tensor | None = None
    guidance: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def conditioned(self, labels, guidance: float, guidance_rescale: float = 0.0) -> LoadedModel:
        """This model asked for ``labels`` (int64 (B,), one per sample of the batches it will get)
        with guidance scale ``guidance`` and rescale ``guidance_rescale`` (a copy; the network
        is shared). Checked by ``check_conditioning``."""
        import dataclasses

        y = None if labels is None else torch.as_tensor(np.asarray(labels, np.int64), device=self.device)
        return dataclasses.replace(self, labels=y, guidance=float(guidance), guidance_rescale=float(guidance_rescale))

    @torch.no_grad()
    def forward(self, x, t, y=None) -> torch.Tensor:
        """The raw network output (float32). The network runs under ``torch.autocast`` (CPU or
        CUDA) in bfloat16/float16 for ``dtype`` "bf16"/"fp16", in float32 for "fp32"; with
        ``dtype=None`` in bf16 autocast on CUDA for a run trained with bf16 (``config.bf16``).
        ``y``: class labels (a conditional network; None there is the null class)."""
        args = (x, t) if y is None else (x, t, y)
        ac = (
            NET_DTYPES[self.dtype]
            if self.dtype is not None
            else (torch.bfloat16 if (self.device.type == "cuda" and self.config.bf16) else torch.float32)
        )
        if ac != torch.float32:
            with torch.autocast(self.device.type, dtype=ac):
                return self.model(*args).float()
        return self.model(*args).float()

    def guided_eps(self, x, t, convert):
        """(eps, variance channels or None) for the labels of ``conditioned``: classifier-free
        guidance (``diffmath.guidance.guided``) of the network's prediction, each half turned
        into eps by ``convert(x, t, pred)`` (x, t and pred of the doubled batch) before the
        combination. The variance channels (learned variance) are the conditional half's.
        s = 1 or s = 0 without rescale: one network call on the labels or the null class."""
        from ..guidance import guided

        C = self.data_shape[0]
        s, phi = self.guidance, self.guidance_rescale
        if self.labels.shape[0] != x.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for a batch of {x.shape[0]}")
        if phi == 0.0 and s in (0.0, 1.0):
            out = self.forward(x, t, self.labels if s == 1.0 else None)
            return convert(x, t, out[:, :C]).float(), (out[:, C:] if self.config.learn_sigma else None)
        rest = {}

        def net(x2, t2, y2):
            out = self.forward(x2, t2, y2)
            rest["v"] = out[: x.shape[0], C:]  # the conditional half's
            return convert(x2, t2, out[:, :C])

        eps = guided(net, self.labels, s, rescale=phi, null_class=self.num_classes)(x, t)
        return eps, (rest["v"] if self.config.learn_sigma else None)

    def eps_model(self, x, t, clip_x0: float | None = None):
        """eps_theta(x, t) for integer t (B,): the eps/x0/v prediction converted to eps
        (``parameterization``); the variance channels of a learned-variance model dropped.

        With ``clip_x0 = c`` the implied x0 = (x - sqrt(1 - abar) eps)/sqrt(abar) is clipped to
        [-c, c] and eps recomputed from it (guided-diffusion's ``clip_denoised``; diffusers'
        ``clip_sample``), so a DDIM/DDPM step moves toward a denoised image inside the data range."""
        from ..parameterization import eps_from_prediction, eps_from_x0, x0_from_eps, x0_from_prediction

        C = self.data_shape[0]
        s, pred = self.schedule, self.config.prediction
        if self.labels is not None:
            eps, _ = self.guided_eps(x, t, lambda xx, tt, p: eps_from_prediction(pred, s, xx, tt, p))
            if clip_x0 is None:
                return eps.to(x.dtype)
            x0 = x0_from_eps(s, x.float(), t, eps).clamp(-clip_x0, clip_x0)
            return eps_from_x0(s, x.float(), t, x0).to(x.dtype)
        out = self.forward(x, t)[:, :C]
        if clip_x0 is None:
            return eps_from_prediction(pred, s, x, t, out).to(x.dtype)
        x0 = x0_from_prediction(pred, s, x, t, out).clamp(-clip_x0, clip_x0)
        return eps_from_x0(s, x.float(), t, x0).to(x.dtype)


def load_model(
    run=None, checkpoint=None, device: str = "auto", ema: bool = True, trust_unverified: bool = False
) -> LoadedModel:
    """The model of a run directory (its latest checkpoint) or of one checkpoint file, with the
    EMA weights (``ema=False``: the raw weights), in eval mode. The weights must match the
    SHA-256 of the checkpoint's JSON sidecar; one that cannot be verified (no sidecar, or no
    ``weights_sha256`` in it) is refused unless ``trust_unverified`` (``checkpoint.load_checkpoint``)."""
    from .checkpoint import RunError, check_class_count, latest_checkpoint, load_checkpoint
    from .config import TrainConfig
    from .distributed import resolve_device
    from .model import build_model, make_schedule

    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of run (a run directory) or checkpoint (a step-NNNNNN file)")
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise RunError(f"--run {str(run)!r} is not a directory")
        ck = latest_checkpoint(run)
        if ck is None:
            raise RunError(f"--run {str(run)!r} holds no checkpoint (step-NNNNNN.json); train it first")
    else:
        ck = Path(checkpoint)
        if not ck.exists():
            raise RunError(f"--checkpoint {str(ck)!r} does not exist")
    meta, tensors = load_checkpoint(ck, trust_unverified=trust_unverified)
    try:
        config = TrainConfig.from_dict(meta["config"])
        data_shape = tuple(meta["data_shape"])
    except (TypeError, ValueError) as e:
        raise RunError(f"{str(ck)!r} does not hold a usable diffmath config: {e}") from e
    check_class_count(config.num_classes, tensors, repr(str(ck)))
    dev = resolve_device(device)
    model = build_model(config, data_shape)
    prefix = "ema." if ema else "model."
    sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise RunError(f"the weights in {str(ck)!r} do not fit the model its config describes: {e}") from e
    model.to(dev).eval()
    return LoadedModel(model, config, make_schedule(config), data_shape, meta["bins"], meta["step"], dev, Path(ck))
