"""The fused per-sample affine update behind ``q_sample``, the sampler steps and ``randn``:

    out = a x + b y' + c z,     y' = clamp(p x + q y, -clip, clip) with CLIP, else y,

with (a, b, c, p, q) per sample (python scalars, per-row arrays, or table rows gathered at
t[row] in the kernel), z either read from ``noise`` or drawn in the kernel (``_tile.py``).
One pass: x, y and noise are read once and out is written once.

``launch_affine`` validates nothing (the public functions do); it picks the grid and block
size. ``torch_affine`` is the torch path's expression of the same update with as few passes
and temporaries as eager torch allows, ``torch_update`` adds the torch path's noise and casts.
``affine_update`` runs one validated update on the path ``use_triton`` picks (q_sample and
every sampler step go through it), refusing host-folded coefficients that overflow.
docs/kernels.md, "The coefficients of each update", lists (a, b, c, p, q) of every public
function; each function's docstring shows its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (
    HAVE_TRITON,
    device_table,
    f32,
    gather_rows,
    interpreting,
    per_sample,
    rows_of,
    stream_generator,
    to_dtype,
    torch_normal,
    use_triton,
)

__all__ = [
    "affine_kernel",
    "launch_affine",
    "torch_affine",
    "torch_update",
    "affine_update",
    "check_coefs",
    "seed_halves",
    "tile_block",
    "grid_for",
    "FAST_MATH",
]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._tile import normal_tile, philox_key, tile_position

    @triton.jit(do_not_specialize=["ca", "cb", "cc", "cp", "cq", "clip", "seed_lo", "seed_hi", "offset"])
    def affine_kernel(
        x_ptr, y_ptr, z_ptr, out_ptr, coef_ptr, t_ptr,
        ca, cb, cc, cp, cq, clip,
        inner, coef_stride, seed_lo, seed_hi, offset,
        HAS_X: tl.constexpr, HAS_Y: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr,
        COEF: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
    ):  # fmt: skip
        """NOISE: 0 none, 1 read z_ptr, 2 Philox. COEF: 0 scalars, 1 coef_ptr[k, row],
        2 coef_ptr[k, t_ptr[row]] (k = 0..4 for a, b, c, p, q; rows coef_stride apart)."""
        row, row_start, local, ctr0 = tile_position(offset, inner, ROWS, ALIGNED, BLOCK)
        mask = (local >= 0) & (local < inner)
        if COEF == 0:
            a = ca
            b = cb
            c = cc
            p = cp
            q = cq
        else:
            if COEF == 1:
                idx = row
            else:
                idx = tl.load(t_ptr + row)
            a = tl.load(coef_ptr + idx)
            b = tl.load(coef_ptr + coef_stride + idx)
            c = tl.load(coef_ptr + 2 * coef_stride + idx)
            if CLIP:
                p = tl.load(coef_ptr + 3 * coef_stride + idx)
                q = tl.load(coef_ptr + 4 * coef_stride + idx)
            else:
                p = 0.0
                q = 0.0
        if HAS_X:
            x = tl.load(x_ptr + row_start + local, mask=mask, other=0.0).to(tl.float32)
            acc = a * x
        else:
            acc = tl.zeros([BLOCK, 4], dtype=tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + row_start + local, mask=mask, other=0.0).to(tl.float32)
            if CLIP:
                y = tl.minimum(tl.maximum(p * x + q * y, -clip), clip)
            acc += b * y
        if NOISE == 1:
            z = tl.load(z_ptr + row_start + local, mask=mask, other=0.0).to(tl.float32)
            acc += c * z
        elif NOISE == 2:
            k0, k1 = philox_key(seed_lo, seed_hi)
            acc += c * normal_tile(k0, k1, ctr0, BLOCK, FAST)
        tl.store(out_ptr + row_start + local, acc.to(out_ptr.dtype.element_ty), mask=mask)

else:  # pragma: no cover
    affine_kernel = None

#: compiled kernels use the hardware approximations in Box-Muller; the interpreter cannot.
FAST_MATH = HAVE_TRITON and not interpreting(affine_kernel)

#: counters per program (4 draws each): 2048 elements per program for large rows.
MAX_BLOCK = 512
#: the CUDA grid's second axis holds at most 65535 programs.
MAX_CHUNKS = 65535
INT32_SAFE = 2**31 - 2**16


def seed_halves(seed: int):
    """The seed's low and high 32 bits as int32 bit patterns (one kernel signature for every seed)."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return (lo - 2**32 if lo >= 2**31 else lo), (hi - 2**32 if hi >= 2**31 else hi)


def tile_block(inner: int) -> int:
    """Counters per program: 4 * BLOCK >= inner for small rows (16 <= BLOCK <= MAX_BLOCK)."""
    need = max(1, (inner + 3) // 4)
    return max(16, min(MAX_BLOCK, 1 << (need - 1).bit_length()))


def grid_for(numel: int, rows: int, per_row: bool, noise_in_kernel: bool, offset: int):
    """(ROWS, inner, BLOCK, ALIGNED, grid) for an elementwise launch over ``numel`` elements."""
    use_rows = per_row or numel >= INT32_SAFE
    grid: tuple[int, ...]  # (rows, chunks) or (chunks,)
    if use_rows:
        inner = numel // rows
        if inner >= INT32_SAFE:
            raise ValueError(f"each sample must hold fewer than 2**31 elements; got {inner}")
    else:
        inner = numel
    block = tile_block(inner)
    aligned = (not noise_in_kernel) or (offset % 4 == 0 and (not use_rows or inner % 4 == 0))
    span = 4 * block
    chunks = -(-(inner + (0 if aligned else 3)) // span)
    if use_rows:
        while chunks > MAX_CHUNKS and block < 4 * MAX_BLOCK:
            block *= 2
            span = 4 * block
            chunks = -(-(inner + (0 if aligned else 3)) // span)
        if chunks > MAX_CHUNKS:
            raise ValueError(f"each sample must hold at most {MAX_CHUNKS * span} elements; got {inner}")
        grid = (rows, chunks)
    else:
        grid = (chunks,)
    return use_rows, inner, block, aligned, grid


def launch_affine(
    out,
    *,
    x=None,
    y=None,
    z=None,
    coef=None,
    t=None,
    scalars=(0.0, 0.0, 0.0, 0.0, 0.0),
    clip=None,
    seed=None,
    offset=0,
    rows=1,
):
    """Run ``affine_kernel`` writing ``out`` (contiguous). x, y, z: contiguous tensors of out's
    numel or None; ``coef``: a (k, L) float32 tensor (per-row arrays with ``t=None``, a table
    gathered at ``t`` otherwise) or None for ``scalars``; ``seed``: in-kernel noise."""
    n = out.numel()
    if n == 0:
        return out
    noise_mode = 2 if seed is not None else (1 if z is not None else 0)
    coef_mode = 0 if coef is None else (1 if t is None else 2)
    use_rows, inner, block, aligned, grid = grid_for(n, rows, coef_mode != 0, noise_mode == 2, offset)
    lo, hi = seed_halves(seed) if seed is not None else (0, 0)
    a, b, c, p, q = (float(v) for v in scalars)
    affine_kernel[grid](
        x if x is not None else out, y if y is not None else out, z if z is not None else out, out,
        coef if coef is not None else out, t if t is not None else out,
        a, b, c, p, q, float(clip) if clip is not None else 0.0,
        inner, coef.stride(0) if coef is not None else 0, lo, hi, offset,
        HAS_X=x is not None, HAS_Y=y is not None, NOISE=noise_mode, CLIP=clip is not None,
        COEF=coef_mode, ROWS=use_rows, ALIGNED=aligned, BLOCK=block, FAST=FAST_MATH,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- torch path
def _acc_add(acc, v, c):
    """acc += c v in place (c a python float or a broadcastable tensor)."""
    if isinstance(c, float):
        return acc.add_(v) if c == 1.0 else acc.add_(v, alpha=c)
    return acc.addcmul_(v, c)


def _scaled(v, c):
    """c v as a new tensor."""
    if isinstance(c, float):
        return v.clone() if c == 1.0 else torch.mul(v, c)
    return torch.mul(v, c)


def torch_affine(x, a, y=None, b=None, z=None, c=None, *, fresh_z: bool = False, clip=None, p=None, q=None):
    """a x + b y' + c z in eager torch with the fewest passes (y' as in the kernel).

    Coefficients are python floats or tensors broadcasting against x; ``fresh_z`` says z
    is a temporary the caller gives away, so it becomes the accumulator (no extra buffer)."""
    if y is not None and clip is not None:
        y = _acc_add(_scaled(x, p), y, q).clamp_(-clip, clip)
        acc = y.mul_(b) if not isinstance(b, float) or b != 1.0 else y
        _acc_add(acc, x, a)
        y = None
    elif z is not None and fresh_z:
        acc = z.mul_(c) if not (isinstance(c, float) and c == 1.0) else z
        z = None
        if x is not None:
            _acc_add(acc, x, a)
    elif x is not None and y is not None and isinstance(a, float) and a == 1.0 and isinstance(b, float):
        acc = torch.add(x, y, alpha=b)
        y = None
    else:
        acc = _scaled(x, a)
    if y is not None:
        _acc_add(acc, y, b)
    if z is not None:
        _acc_add(acc, z, c)
    return acc


# On a CPU, a large update that draws its noise runs through the tensor in chunks that stay in
# cache, the normals drawn chunk by chunk: one pass over memory instead of one per torch op
# (one-off measurements on this project's CPU, one thread, chunked / one call: DDPM step with
# clipping 0.71 at 2^21 and 0.67 at 2^22 elements, 0.87 at 2^20; q_sample with a scalar t
# 0.80 / 0.70 / 1.05). Updates without noise got slower in chunks (DDIM eta = 0: 1.3-1.6), so
# they stay one call per op; so do per-sample coefficients (tensor t).
CPU_CHUNK_MIN = 1 << 21
CPU_CHUNK = 1 << 15


def torch_update(x, a, y, b, c, noise, seed, offset, cd, clip=None, p=None, q=None):
    """The torch path of one update: ``torch_affine`` in the compute dtype ``cd`` with z the
    given ``noise``, or the torch stream's draws at ``(seed, offset)`` (``torch_normal``), or no
    noise term; returned contiguous in x's dtype."""
    if (
        seed is not None
        and x.device.type == "cpu"
        and x.numel() >= CPU_CHUNK_MIN
        and all(v is None or isinstance(v, float) for v in (a, b, c, p, q))
    ):
        return _torch_update_chunked(x, a, y, b, c, seed, offset, cd, clip, p, q)
    xc = to_dtype(x, cd)
    yc = to_dtype(y, cd) if y is not None else None
    if seed is not None:
        z = to_dtype(torch_normal(x.shape, seed, offset, x.device), cd)
        out = torch_affine(xc, a, yc, b, z, c, fresh_z=True, clip=clip, p=p, q=q)
    elif noise is not None:
        out = torch_affine(xc, a, yc, b, to_dtype(noise, cd), c, clip=clip, p=p, q=q)
    else:
        out = torch_affine(xc, a, yc, b, clip=clip, p=p, q=q)
    out = to_dtype(out, x.dtype)
    return out if out.is_contiguous() else out.contiguous()


def _chunk_bounds(n: int, chunk: int) -> list:
    """Chunk boundaries 0 = b_0 < ... < b_k = n: every chunk ``chunk`` long but the last, which
    is merged into the one before when it would be shorter than 16."""
    bounds = list(range(0, n, chunk)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        del bounds[-2]
    return bounds


def _torch_update_chunked(x, a, y, b, c, seed, offset, cd, clip, p, q):
    """``torch_update`` with the stream's noise on a CPU, over cache-sized chunks of the flat
    (C-order) tensors, for python-float coefficients. Bit-identical to the one-call path,
    element by element: the same ops in the same order, and the same normals: drawn chunk after
    chunk from one generator they are the numbers of one ``torch.randn`` over the whole tensor,
    because CPU ``normal_`` turns consecutive uniforms into normals in blocks of 16 (and redraws
    a tail of 16 when the length is not a multiple of 16), and every chunk but the last is a
    multiple of 16 long and the last at least 16 (tests/kernels/test_kernel_dispatch.py checks
    this against the one-call path)."""
    xf = x.reshape(-1)
    yf = y.reshape(-1) if y is not None else None
    out = torch.empty(x.shape, dtype=x.dtype)
    of = out.view(-1)
    g = stream_generator(seed, offset, x.device)
    bounds = _chunk_bounds(x.numel(), CPU_CHUNK)
    zbuf = torch.empty(max(j - i for i, j in zip(bounds, bounds[1:])), dtype=torch.float32)
    for i, j in zip(bounds, bounds[1:]):
        z = to_dtype(zbuf[: j - i].normal_(generator=g), cd)
        yc = to_dtype(yf[i:j], cd) if yf is not None else None
        of[i:j].copy_(torch_affine(to_dtype(xf[i:j], cd), a, yc, b, z, c, fresh_z=True, clip=clip, p=p, q=q))
    return out


# ----------------------------------------------------------------------------- one update, either path
def check_coefs(coefs, dtype: torch.dtype, what: str):
    """Refuse per-sample coefficients that are not finite once cast to ``dtype`` (float32 for
    the kernels and float16/bfloat16/float32 data, float64 on the float64 torch path): an
    oversized step size or SDE coefficient would otherwise turn the output into inf/NaN."""
    npd = np.float64 if dtype == torch.float64 else np.float32
    for c in coefs:
        if isinstance(c, float):
            if math.isfinite(c) and (npd is np.float64 or math.isfinite(f32(c))):
                continue
            v = c
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                bad = ~np.isfinite(np.asarray(c, dtype=np.float64).astype(npd))
            if not bad.any():
                continue
            v = float(np.asarray(c, dtype=np.float64)[bad].reshape(-1)[0])
        raise ValueError(
            f"{what} gives a step coefficient of {v:.4g}, which is not finite in {np.dtype(npd).name}: "
            "the step would return inf/NaN"
        )


def affine_update(
    x, y, coefs, noise, seed, offset, *, clip=None, s=None, kind=None, build=None, t=None, what="the coefficients"
):
    """out = a x + b y' + c z on the path ``use_triton`` picks, for validated arguments: y the
    model output (or None), (a, b, c[, p, q]) = ``coefs`` (python floats or float64 (B,) arrays)
    or, with an integer tensor ``t``, gathered at t from the table ``build(s)`` cached under
    ``kind`` (which the caller has checked). Host-folded coefficients must be finite after the
    cast to the compute dtype (ValueError naming ``what``, the arguments they come from;
    ``what=None``: coefficients that cannot overflow or were checked already)."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    tabled = t is not None and not isinstance(t, int)
    triton_path = use_triton(x, affine_kernel)
    if not tabled and what is not None:
        check_coefs(coefs, torch.float64 if (x.dtype == torch.float64 and not triton_path) else torch.float32, what)
    scalar = not tabled and all(isinstance(c, float) for c in coefs)
    if triton_path:
        B = rows_of(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        kw = dict(
            x=x.contiguous(),
            y=y.contiguous() if y is not None else None,
            z=noise.contiguous() if noise is not None else None,
            clip=clip,
            seed=seed,
            offset=offset,
            rows=B,
        )
        if tabled:
            return launch_affine(out, coef=device_table(s, kind, x.device, torch.float32, build), t=t, **kw)
        if scalar:
            sc = tuple(f32(c) for c in coefs) + (0.0,) * (5 - len(coefs))
            return launch_affine(out, scalars=sc, **kw)
        arr = np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), (B,)) for c in coefs]).astype(np.float32)
        return launch_affine(out, coef=torch.from_numpy(arr).to(x.device), **kw)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if tabled:
        cs = gather_rows(device_table(s, kind, x.device, cd, build), t, x)
    elif scalar:
        cs = coefs if cd == torch.float64 else [f32(c) for c in coefs]
    else:
        B = rows_of(x)
        cs = [
            per_sample(
                torch.from_numpy(np.broadcast_to(np.asarray(c, dtype=np.float64), (B,)).copy()).to(x.device, cd), x
            )
            for c in coefs
        ]
    if clip is None:
        return torch_update(x, cs[0], y, cs[1], cs[2], noise, seed, offset, cd)
    return torch_update(x, cs[0], y, cs[1], cs[2], noise, seed, offset, cd, clip, cs[3], cs[4])
