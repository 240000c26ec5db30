"""The training loss L_simple = mean ||eps - eps_theta||^2 (DDPM eq. 14) with eps regenerated
from ``(seed, offset)`` instead of stored.

``q_sample(s, x0, t, seed=k, offset=o)`` drew eps in its kernel; ``simple_loss(eps_pred, k, o)``
draws the same eps again in its forward kernel (a one-pass sum of squares into per-program
partial sums, reduced deterministically) and once more in its backward kernel (the gradient
2 (eps_pred - eps) / n in one pass). Nothing of size eps is kept between the three.
(The torch path draws eps from its own stream and lets F.mse_loss keep it for the backward:
regenerating would cost a second torch.randn, which is most of its time on a CPU.)
``simple_loss_reference`` beside the wrapper is the torch reference the tests hold both paths
to: the core ``diffmath.losses.simple_loss`` in float64 on the same eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import losses
from ..checks import check_int
from ._affine import FAST_MATH, grid_for, launch_affine, seed_halves
from ._common import HAVE_TRITON, check_offset, check_x, rows_of, torch_normal, use_triton
from .noise import randn

__all__ = ["simple_loss", "simple_loss_reference"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._tile import normal_tile, philox_key, tile_position, tile_sum

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset"])
    def sq_err_kernel(
        p_ptr, part_ptr, inner, n_chunks, seed_lo, seed_hi, offset,
        ROWS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
    ):  # fmt: skip
        """part[row, chunk] = sum over the tile of (eps_pred - eps)^2, eps from Philox."""
        row, row_start, local, ctr0 = tile_position(offset, inner, ROWS, ALIGNED, BLOCK)
        mask = (local >= 0) & (local < inner)
        pred = tl.load(p_ptr + row_start + local, mask=mask, other=0.0).to(tl.float32)
        k0, k1 = philox_key(seed_lo, seed_hi)
        d = tl.where(mask, pred - normal_tile(k0, k1, ctr0, BLOCK, FAST), 0.0)
        if ROWS:
            chunk = tl.program_id(1)
        else:
            chunk = tl.program_id(0)
        tl.store(part_ptr + row * n_chunks + chunk, tile_sum(d * d, BLOCK))

else:  # pragma: no cover
    sq_err_kernel = None


def _check_reduction(reduction):
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (one value per sample); got {reduction!r}")


def _forward_triton(pred, seed, offset, reduction):
    p = pred.contiguous()
    n, rows = p.numel(), rows_of(p)
    use_rows, inner, block, aligned, grid = grid_for(n, rows, reduction == "none", True, offset)
    n_chunks = grid[-1]
    part = torch.empty((rows if use_rows else 1) * n_chunks, dtype=torch.float32, device=p.device)
    lo, hi = seed_halves(seed)
    sq_err_kernel[grid](
        p, part, inner, n_chunks, lo, hi, offset, ROWS=use_rows, ALIGNED=aligned, BLOCK=block, FAST=FAST_MATH
    )
    if reduction == "mean":
        return (part.sum(dtype=torch.float64) / n).to(torch.float32)
    return (part.view(rows, n_chunks).sum(dim=1, dtype=torch.float64) / (n // rows)).to(torch.float32)


def _eps_torch(pred, seed, offset, cd):
    eps = torch_normal(pred.shape, seed, offset, pred.device)
    return eps if eps.dtype == cd else eps.to(cd)


def _loss_torch(pred, seed, offset, reduction):
    """The torch path: eps drawn from the torch stream, then F.mse_loss (autograd keeps eps for
    the backward: regenerating it would cost a second torch.randn, most of the time on a CPU)."""
    cd = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pc = pred if pred.dtype == cd else pred.to(cd)
    eps = _eps_torch(pred, seed, offset, cd)
    if reduction == "mean":
        return F.mse_loss(pc, eps)
    return F.mse_loss(pc, eps, reduction="none").reshape(rows_of(pred), -1).mean(dim=1)


def _scale(g, pred, reduction):
    """d loss / d eps_pred = scale * (eps_pred - eps): scale = 2 g / n ("mean") or 2 g_b / inner."""
    n = pred.numel()
    if reduction == "mean":
        return g.to(torch.float32).reshape(1) * (2.0 / n)
    return g.to(torch.float32).reshape(-1) * (2.0 / (n // rows_of(pred)))


class _SimpleLoss(torch.autograd.Function):
    """The Triton path's loss: forward and backward each regenerate eps in their kernel."""

    @staticmethod
    def forward(ctx, eps_pred, seed, offset, reduction):
        ctx.seed, ctx.offset, ctx.reduction = seed, offset, reduction
        ctx.save_for_backward(eps_pred)  # autograd holds it anyway; eps is not kept
        return _forward_triton(eps_pred, seed, offset, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (pred,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        sc = _scale(g, pred, ctx.reduction)
        coef = torch.stack([sc, torch.zeros_like(sc), -sc])  # grad = sc pred - sc eps
        out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        rows = rows_of(pred) if ctx.reduction == "none" else 1
        launch_affine(out, x=pred.contiguous(), coef=coef, seed=ctx.seed, offset=ctx.offset, rows=rows)
        return out, None, None, None


def simple_loss(eps_pred, seed, offset=0, *, reduction="mean"):
    """L_simple = mean (eps_pred - eps)^2   (DDPM eq. 14), eps regenerated from (seed, offset).

    eps is the noise that ``q_sample(s, x0, t, seed=seed, offset=offset)`` drew for an x0 with
    eps_pred's number of elements (element i: draw offset + i). eps_pred: tensor (B, ...),
    float32/float16/bfloat16 (float64 on the torch path). ``reduction="mean"`` gives the mean
    over all elements, ``"none"`` one value per sample (mean over the non-batch dims), shape
    (B,). float32 result (float64 for float64 input). Differentiable in eps_pred; backward
    regenerates eps again and writes the gradient in one pass. With an explicit eps tensor
    use ``diffmath.losses.simple_loss(eps, eps_pred)``.

    Forward: its own kernel, per-program partial sums of (eps_pred - eps)^2 reduced in float64.
    Backward: the fused affine update out = a x + b y + c z (``_affine.py``) with x = eps_pred,
    no y, z = eps regenerated, and with g the incoming gradient

        a = 2 g / n,   b = 0,   c = -2 g / n       (n = numel; "none": 2 g_b / (n / B) per sample)
    """
    eps_pred = check_x(eps_pred, "eps_pred", grad_ok=True)
    _check_reduction(reduction)
    if seed is None:
        raise ValueError(
            "seed must be the int given to q_sample(..., seed=...); with an explicit eps tensor use "
            "diffmath.losses.simple_loss(eps, eps_pred)"
        )
    seed = check_int(seed, "seed", 0, 2**64)
    offset = check_offset(offset, eps_pred.numel())
    if reduction == "none" and eps_pred.ndim == 0:
        raise ValueError("reduction='none' needs a batch dimension: eps_pred of shape (B, ...)")
    if eps_pred.numel() == 0:
        raise ValueError(f"eps_pred must hold at least one element; got shape {tuple(eps_pred.shape)}")
    if use_triton(eps_pred, sq_err_kernel):
        return _SimpleLoss.apply(eps_pred, seed, offset, reduction)
    return _loss_torch(eps_pred, seed, offset, reduction)


def simple_loss_reference(eps_pred, seed, offset=0, *, reduction="mean"):
    """The torch reference of ``simple_loss``: the core ``diffmath.losses.simple_loss`` in
    float64 on eps_pred's device against the active path's draws at ``(seed, offset)``
    (``diffmath.kernels.randn``), returned in float32 (float64 for float64 input)."""
    eps = randn(eps_pred.shape, seed, offset, device=eps_pred.device).double()
    out = losses.simple_loss(eps, eps_pred.double(), reduction)
    return out if eps_pred.dtype == torch.float64 else out.float()
