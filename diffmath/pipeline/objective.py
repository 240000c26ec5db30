"""The training objective of one batch (DDPM eq. 14, Improved DDPM eq. 16) as a function of the
network, the schedule and the batch; the loop (``diffmath.pipeline.loop``) draws the batch, the
timesteps and the noise keys.

- eps-prediction with fixed variance: x_t = ``kernels.q_sample(s, x0, t, seed=, offset=)``
  with the noise drawn inside the kernel from a Philox stream, and
  L_simple = ``kernels.simple_loss(eps_pred, seed, offset)``, which regenerates the same eps
  from (seed, offset): the noise tensor never touches memory (on CUDA; the torch fallback
  of ``diffmath.kernels`` runs the same math on CPU). ``fused_loss``.
- x0- or v-prediction, or a learned variance: the noise is drawn explicitly (a seeded
  ``torch.Generator``) and the core's DDPM Alg. 1, ``losses.ddpm_training_loss``, builds x_t,
  the target (eps, x0 or v) and L_simple = MSE(target, prediction). ``explicit_loss``.
- learned variance (Improved DDPM's learned range, ``learn_sigma``): the model outputs 2C
  channels; the second half v in [-1, 1] gives log Sigma = ``losses.learned_range_log_variance``.
  The hybrid loss is L_simple + lambda * T * L_t (guided-diffusion's convention: L_vlb = sum_t L_t
  is estimated by T * L_t for uniform t, in bits/dim, lambda = 0.001), where L_t =
  ``losses.vb_terms_bpd`` evaluated with the model's mean under a stop-gradient, so the VLB
  term trains only the variance (Improved DDPM, Sec. 3.1).

Under DistributedDataParallel on the torch fallback, a rank's fused loss is ``sharded_fused_loss``
(see ``training_loss``), so that every sample gets the noise it gets in a single-process run.
"""

from __future__ import annotations

import contextlib

import torch

from .. import losses, posterior
from ..parameterization import x0_from_prediction
from .config import TrainConfig


def kernels_module():
    """``diffmath.kernels`` (the folder kernels/), with an ImportError that says how to fix a broken install."""
    try:
        from .. import kernels  # noqa: F401  (diffmath.kernels, the folder kernels/)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "diffmath.kernels is not importable (the kernels/ folder is installed as diffmath.kernels); "
            f"reinstall the package: {e}"
        ) from e
    return kernels


def philox_path(x: torch.Tensor) -> bool:
    """Whether kernel calls on tensors like ``x`` take the Triton path, whose noise for element
    i is Philox draw offset + i (a shift of one stream); the torch fallback keys a fresh
    stream by (seed, offset) instead (docs/kernels.md, "Noise streams")."""
    return kernels_module().philox_active(x)


def uses_fused_noise(config: TrainConfig) -> bool:
    """eps-prediction with a fixed variance draws its noise inside the fused kernels."""
    return config.prediction == "eps" and not config.learn_sigma


def model_outputs(config: TrainConfig, out: torch.Tensor, C: int):
    """Split a network output into (prediction, variance value v or None)."""
    if config.learn_sigma:
        return out[:, :C], out[:, C:]
    return out, None


def training_loss(
    config, model, s, x0, t, *, seed_noise=None, offset=0, noise=None, bins=256, autocast=None, shard=None, y=None
):
    """The loss of one (local) batch; returns (loss, parts dict).

    ``y``: the class labels of a conditional run after label dropout (int64 (B,), the null
    class ``num_classes`` where dropped), passed to the network as ``model(x_t, t, y)``; None
    for an unconditional run (``model(x_t, t)``).

    Fused path (``uses_fused_noise``): ``kernels.q_sample`` + ``kernels.simple_loss`` keyed by
    (seed_noise, offset), ``offset`` the stream position of this batch's first element.
    Explicit path: ``noise`` given, the core builds x_t and the target.

    ``shard = (x0_global, t_global, rank, world)`` under DDP, where this rank's rows are
    ``rank*B:(rank+1)*B`` of the global batch and ``offset`` is the global batch's. On the
    Triton path the Philox stream is shifted by the offset, so the rank draws only its rows
    (offset + rank*B*D). The torch fallback keys a whole stream by (seed, offset) instead
    (docs/kernels.md), so there the rank noises the (cheap) global batch with one call and keeps
    its rows, and regenerates the loss's eps at the global shape with zero predictions outside
    its rows: either way every sample gets the noise it gets in a single-process run.
    """
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    cond = () if y is None else (y,)
    if not uses_fused_noise(config):
        return explicit_loss(config, model, s, x0, t, noise, bins=bins, ctx=ctx, cond=cond)
    if shard is None or shard[3] == 1 or philox_path(x0):
        off = offset if shard is None else offset + shard[2] * x0.numel()
        return fused_loss(model, s, x0, t, seed_noise, off, ctx=ctx, cond=cond)
    return sharded_fused_loss(model, s, t, shard, seed_noise, offset, ctx=ctx, cond=cond)


def fused_loss(model, s, x0, t, seed_noise, offset, *, ctx, cond=()):
    """L_simple with the noise of the fused kernels: x_t = ``kernels.q_sample`` and the loss
    ``kernels.simple_loss`` both keyed by (seed_noise, offset), ``offset`` the stream position of
    the batch's first element. Returns (loss, {"mse": loss})."""
    K = kernels_module()
    x_t = K.q_sample(s, x0, t, seed=seed_noise, offset=offset)
    with ctx:
        out = model(x_t, t, *cond)
    loss = K.simple_loss(out.float(), seed_noise, offset)
    return loss, {"mse": loss.detach()}


def sharded_fused_loss(model, s, t, shard, seed_noise, offset, *, ctx, cond=()):
    """``fused_loss`` of rank r's rows r*B:(r+1)*B of a global batch on the torch fallback, whose
    noise stream is keyed by (seed, offset) as a whole: noise the global batch ``shard[0]`` (at
    the global ``offset``) and keep the rank's rows, then regenerate the loss's eps at the global
    shape with zero predictions outside them. ``shard = (x0_global, t_global, rank, world)``;
    ``t`` is the rank's timesteps."""
    K = kernels_module()
    xg, tg, r, world = shard
    B = t.shape[0]
    x_t = K.q_sample(s, xg, tg, seed=seed_noise, offset=offset)[r * B : (r + 1) * B]
    with ctx:
        out = model(x_t, t, *cond).float()
    full = torch.cat(
        [out.new_zeros((r * B,) + out.shape[1:]), out, out.new_zeros(((world - r - 1) * B,) + out.shape[1:])]
    )
    loss = K.simple_loss(full, seed_noise, offset, reduction="none")[r * B : (r + 1) * B].mean()
    return loss, {"mse": loss.detach()}


def explicit_loss(config: TrainConfig, model, s, x0, t, noise, *, bins=256, ctx=None, cond=()):
    """L_simple of DDPM Alg. 1 with explicit ``noise`` (``losses.ddpm_training_loss``: x_t, the
    target of ``config.prediction`` and the MSE), plus lambda * T * L_t for a learned variance
    (the hybrid loss of Improved DDPM, see the module docstring). Returns (loss, parts)."""
    C = x0.shape[1]
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    seen = {}

    def predict(x_t, t):  # the network under autocast; a learned variance's channels kept aside
        with ctx:
            out = model(x_t, t, *cond)
        seen["x_t"] = x_t
        seen["pred"], seen["v"] = model_outputs(config, out.float(), C)
        return seen["pred"]

    mse = losses.ddpm_training_loss(s, predict, x0, t, noise, prediction=config.prediction)  # DDPM Alg. 1
    x_t, pred, v = seen["x_t"], seen["pred"], seen["v"]
    if v is None:
        return mse, {"mse": mse.detach()}
    with torch.no_grad():  # stop-gradient on the mean (Improved DDPM, Sec. 3.1)
        x0_pred = x0_from_prediction(config.prediction, s, x_t, t, pred.detach())
        mean = posterior.q_posterior_mean(s, x0_pred, x_t, t)
    log_var = losses.learned_range_log_variance(s, t, v)
    vb = losses.vb_terms_bpd(s, mean, log_var, x0, x_t, t, bins=bins)
    loss = mse + config.hybrid_lambda * s.num_timesteps * vb.mean()
    return loss, {"mse": mse.detach(), "vb": vb.mean().detach()}
