"""In-kernel noise for the Triton path: Philox4x32-10 and a Box-Muller transform from full
32-bit draws, laid out as tiles of 4 * BLOCK consecutive normals.

The stream (binding; docs/design.md, "The noise stream of the kernels"): the normal at flat
element i of a call is Philox draw number ``d = offset + i`` under ``seed``: counter ``d // 4``
(the 64-bit counter in the first two Philox words, the last two zero), key
``(seed mod 2**32, seed >> 32)``, lane ``d % 4``. One Philox call gives four uint32
``(r0, r1, r2, r3)`` and four normals:

    u     = r0 * 2**-32 + 2**-33       in (0, 1]   (float32; never 0, so no clamp is needed)
    theta = 2 pi s * 2**-32            in [-pi, pi), s = r1 read as a signed int32
    rad   = sqrt(-2 log(2) log2(u))
    lane 0 = rad cos(theta),  lane 1 = rad sin(theta);  lanes 2, 3: the same from (r2, r3).

Why not ``tl.randn``: it builds its uniform from 31 bits (the sign bit is folded away) and
clamps u >= 1e-7, so |z| never exceeds sqrt(-2 log 1e-7) = 5.68 and the 1e-7 of probability
mass beyond is piled onto radius 5.68 (docs/kernels.md, "Noise quality"). Here u >= 2**-33,
the largest radius is sqrt(66 log 2) = 6.76 and P(|z| > 6.76) = 1.4e-11. The Philox rounds are
written out here (identical to ``tl.randint4x``, checked against the Random123 known-answer
vectors in tests/kernels/test_kernel_noise.py) so that the kernels use nothing but Triton builtins
and their own jit helpers, and run under ``TRITON_INTERPRET=1`` whatever was imported first.

Tiles: ``normal_tile`` returns a [BLOCK, 4] tensor whose entry [k, m] is draw
``4 * (ctr0 + k) + m``; ``tile_offsets`` gives the matching element offsets 4 k + m, so a tile
maps onto 4 * BLOCK contiguous elements, each thread holding the four lanes of its Philox
call (16-byte vector loads and stores, no shuffles).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # the hardware approximations (compiled kernels only; the interpreter has no libdevice)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    libdevice = None

try:  # the interpreter recognises this combine function and reduces with numpy
    from triton.language.standard import _sum_combine
except ImportError:  # pragma: no cover - older/newer Triton

    @triton.jit
    def _sum_combine(a, b):
        return a + b


PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2**-32
TWO_POW_M33 = tl.constexpr(1.1641532182693481e-10)  # 2**-33
TWO_PI_POW_M32 = tl.constexpr(1.4629180792671596e-09)  # 2 pi 2**-32
MINUS_2_LN2 = tl.constexpr(-1.3862943611198906)  # -2 log(2)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) on uint32 counters (c0..c3) and key (k0, k1)."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.math.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.math.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = tl.mul(PHILOX_ROUND_B, _c2, sanitize_overflow=False)
        c3 = tl.mul(PHILOX_ROUND_A, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def box_muller(a, b, FAST: tl.constexpr):
    """Two independent N(0, 1) (float32) from two uint32 draws (see the module docstring).
    FAST (compiled kernels): the hardware approximations lg2/sin/cos.approx (absolute error
    below 1e-6 here); the interpreter uses numpy's float32 libm."""
    u = a.to(tl.float32) * TWO_POW_M32 + TWO_POW_M33
    theta = b.to(tl.int32, bitcast=True).to(tl.float32) * TWO_PI_POW_M32
    if FAST:
        r = tl.sqrt(tl.maximum(MINUS_2_LN2 * libdevice.fast_log2f(u), 0.0))
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(tl.maximum(MINUS_2_LN2 * tl.log2(u), 0.0))
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def philox_key(seed_lo, seed_hi):
    """The Philox key from the seed's two 32-bit halves (passed as int32 bit patterns)."""
    return seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)


@triton.jit
def normal_tile(k0, k1, ctr0, BLOCK: tl.constexpr, FAST: tl.constexpr):
    """4 * BLOCK standard normals: entry [k, m] of the [BLOCK, 4] result is Philox draw
    4 * (ctr0 + k) + m (ctr0: int64 counter of the tile's first draw)."""
    ctr = ctr0 + tl.arange(0, BLOCK).to(tl.int64)
    c0 = ctr.to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox4x32(c0, c1, zero, zero, k0, k1)
    n0, n1 = box_muller(r0, r1, FAST)
    n2, n3 = box_muller(r2, r3, FAST)
    # join(join(n0, n2), join(n1, n3))[k, j, l] = lane 2 j + l; the reshape keeps the four
    # lanes of a counter in one thread (no data movement).
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK, 4])


@triton.jit
def tile_offsets(BLOCK: tl.constexpr):
    """Offsets 4 k + m of a [BLOCK, 4] tile (int32)."""
    return 4 * tl.arange(0, BLOCK)[:, None] + tl.arange(0, 4)[None, :]


@triton.jit
def tile_sum(x, BLOCK: tl.constexpr):
    """Sum of a [BLOCK, 4] tile."""
    return tl.reduce(tl.reshape(x, [4 * BLOCK]), 0, _sum_combine)


@triton.jit
def tile_position(offset, inner, ROWS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Where this program's tile lies. The grid is (rows, chunks) with ROWS, else (chunks,)
    with a single row of ``inner`` elements. Row r holds elements [r inner, (r + 1) inner) and
    draws offset + r inner + [0, inner); chunk c covers the counters (offset + r inner) // 4
    + c BLOCK + [0, BLOCK), i.e. local element positions c 4 BLOCK - lead + [0, 4 BLOCK),
    lead = (offset + r inner) % 4 (0 when ALIGNED).

    Returns (row, row_start (int64), local (tile of int32 positions in the row), ctr0 (int64)).
    """
    if ROWS:
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        row_start = row.to(tl.int64) * inner
        first = offset.to(tl.int64) + row_start
    else:
        row = 0
        chunk = tl.program_id(0)
        row_start = 0
        first = offset.to(tl.int64)
    if ALIGNED:
        lead = 0
    else:
        lead = (first % 4).to(tl.int32)
    local = (chunk * (4 * BLOCK) - lead) + tile_offsets(BLOCK)
    ctr0 = first // 4 + chunk * BLOCK
    return row, row_start, local, ctr0
