"""The in-kernel noise stream: Philox4x32-10 checked against the Random123 known-answer vectors,
the element -> draw mapping against an independent numpy implementation, and the statistics of
the normals (fixed seeds, stated thresholds; every p-value below is a deterministic number for
the fixed seed, asserted > 1e-3)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import diffmath.kernels as K
from diffmath.kernels import _affine, _common
from tests.kernels._kernel_env import PATHS, TRITON_DEVICE
from tests.reference._kernel_ref import philox4x32_10, stream_normal, stream_uint32

# Random123 kat_vectors, philox4x32 with 10 rounds: (ctr0..3, key0..1) -> out0..3
KAT = [
    ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

N_STAT = 1 << 22  # draws for the one-sample statistics
# Large draws use larger tiles (fewer interpreted programs); the stream does not depend on the
# tiling (test_stream_shifts_with_offset_bitwise, test_randn_is_the_reference_stream).
BIG_BLOCK = 8192


def test_reference_philox_known_answers():
    for inp, out in KAT:
        got = [int(v) for v in philox4x32_10(*inp)]
        assert got == list(out)


if TRITON_DEVICE is not None:
    import triton
    import triton.language as tl

    from diffmath.kernels._tile import philox4x32, philox_key

    @triton.jit
    def philox_probe(ctr_ptr, out_ptr, seed_lo, seed_hi, n, BLOCK: tl.constexpr):
        """Writes the four uint32 of _tile.philox4x32 at the given int64 counters."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        ctr = tl.load(ctr_ptr + i, mask=m, other=0)
        k0, k1 = philox_key(seed_lo, seed_hi)
        c0 = ctr.to(tl.uint32)
        c1 = (ctr >> 32).to(tl.uint32)
        r0, r1, r2, r3 = philox4x32(c0, c1, c0 * 0, c0 * 0, k0, k1)
        tl.store(out_ptr + 4 * i, r0.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True), mask=m)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**63 + 2**40 + 7, 2**64 - 1])
def test_kernel_philox_bits_match_reference(triton_path, seed):
    from diffmath.kernels._affine import seed_halves

    ctr = np.concatenate([np.arange(100), 2**32 - 3 + np.arange(6), 2**45 + np.arange(5)]).astype(np.int64)
    out = torch.empty(4 * ctr.size, dtype=torch.int32, device=triton_path)
    lo, hi = seed_halves(seed)
    philox_probe[(1,)](torch.from_numpy(ctr).to(triton_path), out, lo, hi, ctr.size, BLOCK=128)
    ref = philox4x32_10(
        ctr.astype(np.uint64) & 0xFFFFFFFF, ctr.astype(np.uint64) >> 32, 0, 0, seed & 0xFFFFFFFF, seed >> 32
    )
    ref = np.stack(ref, axis=1).reshape(-1).astype(np.uint32)
    assert np.array_equal(out.cpu().numpy().view(np.uint32), ref)


def _close_to_stream(z, seed, offset):
    ref = stream_normal(seed, offset, z.size)
    d = np.abs(z.astype(np.float64) - ref)
    # float32 Box-Muller against float64: ~1e-7 typical; a wrong mapping gives O(1) errors.
    assert np.median(d) < 1e-6 and d.max() < 1e-4, (np.median(d), d.max())


@pytest.mark.parametrize(
    "shape,seed,offset",
    [
        ((1,), 0, 0),
        ((7,), 3, 1),
        ((5, 13), 12345, 2**33 + 3),
        ((3, 2049), 2**40 + 1, 2),
        ((2, 3, 5, 7), 2**64 - 1, 2**62 - 300),
    ],
)
def test_randn_is_the_reference_stream(triton_path, shape, seed, offset):
    z = K.randn(shape, seed, offset, device=triton_path).cpu().numpy().reshape(-1)
    _close_to_stream(z, seed, offset)


def test_torch_philox_bits_match_reference():
    """philox_normal's integer Philox (int64 torch ops, no overflow) against the numpy reference
    and the known-answer vectors, bit for bit."""
    from diffmath.kernels.noise import philox_uint32

    for inp, out in KAT:
        c = [torch.tensor([v], dtype=torch.int64) for v in inp[:4]]
        got = philox_uint32(*c, inp[4] | (inp[5] << 32))
        assert [int(v) for v in got] == list(out)
    ctr = np.concatenate([np.arange(50), 2**32 - 3 + np.arange(6), 2**45 + np.arange(5)]).astype(np.int64)
    for seed in (0, 2**31 + 5, 2**64 - 1):
        t = torch.from_numpy(ctr)
        got = torch.stack(philox_uint32(t & 0xFFFFFFFF, t >> 32, 0 * t, 0 * t, seed), 1).numpy()
        ref = philox4x32_10(
            ctr.astype(np.uint64) & 0xFFFFFFFF, ctr.astype(np.uint64) >> 32, 0, 0, seed & 0xFFFFFFFF, seed >> 32
        )
        assert np.array_equal(got, np.stack(ref, 1).astype(np.int64))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_philox_normal_is_the_reference_stream(device):
    for shape, seed, offset in [((37,), 9, 5), ((4, 1000), 2**63 + 11, 2**35 + 1)]:
        z = K.philox_normal(shape, seed, offset, device=device).cpu().numpy().reshape(-1)
        _close_to_stream(z, seed, offset)


def test_stream_shifts_with_offset_bitwise(triton_path):
    a = K.randn(5000, 77, 1000, device=triton_path)
    for k in (1, 2, 3, 4, 777):
        b = K.randn(5000 - k, 77, 1000 + k, device=triton_path)
        assert torch.equal(a[k:], b)


def test_same_seed_offset_is_bit_identical(path):
    _, dev = path
    a = K.randn((3, 333), 5, 17, device=dev)
    assert torch.equal(a, K.randn((3, 333), 5, 17, device=dev))
    assert not torch.equal(a, K.randn((3, 333), 6, 17, device=dev))
    assert not torch.equal(a, K.randn((3, 333), 5, 18, device=dev))


@pytest.fixture(scope="module")
def big_draws():
    """2**22 draws (seed 20261123, offset 0), the next offset block and the next seed, from the
    Triton stream (interpreted on CPU without a GPU) and from the torch path's stream."""
    out = {}
    for p, dev in PATHS:
        if p in out:
            continue
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DIFFMATH_KERNELS", p)
            mp.setattr(_affine, "MAX_BLOCK", BIG_BLOCK)
            out[p] = {
                "z": K.randn(N_STAT, 20261123, 0, device=dev).double().cpu().numpy(),
                "next_offset": K.randn(N_STAT, 20261123, N_STAT, device=dev).double().cpu().numpy(),
                "next_seed": K.randn(N_STAT, 20261124, 0, device=dev).double().cpu().numpy(),
            }
    return out


@pytest.fixture(params=["triton", "torch"])
def draws(request, big_draws):
    if request.param not in big_draws:
        pytest.skip("no Triton path here")
    return big_draws[request.param]


def test_moments(draws):
    z = draws["z"]
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


def test_ks_against_normal(draws):
    assert stats.kstest(draws["z"], "norm").pvalue > 1e-3


def test_tail_frequencies(draws):
    """Counts beyond 2, 3 and 4 sigma against the exact normal tail (binomial test)."""
    z = np.abs(draws["z"])
    for k in (2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(k)
        assert stats.binomtest(int((z > k).sum()), z.size, p).pvalue > 1e-3, k


def test_no_correlation(draws):
    """Neighbouring elements (lags 1..8, covering the four lanes of a Philox call and the
    cos/sin pair of one Box-Muller radius, also in their squares), the next offset block
    (the next training step) and the next seed: |rho| < 5 / sqrt(n)."""
    z = draws["z"]
    n = z.size
    bound = 5 / math.sqrt(n)
    for lag in range(1, 9):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
    sq = z * z
    assert abs(np.corrcoef(sq[0::2], sq[1::2])[0, 1]) < 5 / math.sqrt(n / 2)  # the cos/sin pair
    assert abs(np.corrcoef(sq[0::4], sq[2::4])[0, 1]) < 5 / math.sqrt(n / 4)  # the two pairs of a call
    assert abs(np.corrcoef(z, draws["next_offset"])[0, 1]) < bound
    assert abs(np.corrcoef(z, draws["next_seed"])[0, 1]) < bound


def test_ks_pvalues_uniform_over_seeds():
    """Second-level test: KS p-values of 256 seeds x 2**15 draws (the reference stream, which
    the kernel reproduces: test_randn_is_the_reference_stream) must look Uniform(0, 1)."""
    ps = [stats.kstest(stream_normal(seed, 0, 1 << 15), "norm").pvalue for seed in range(256)]
    assert stats.kstest(ps, "uniform").pvalue > 1e-3


def test_ks_pvalues_uniform_over_seeds_kernel(triton_path, monkeypatch):
    """The same on the kernel's own output: 128 seeds x 2**15 draws."""
    monkeypatch.setattr(_affine, "MAX_BLOCK", BIG_BLOCK)
    ps = [
        stats.kstest(K.randn(1 << 15, s, 0, device=triton_path).double().cpu().numpy(), "norm").pvalue
        for s in range(128)
    ]
    assert stats.kstest(ps, "uniform").pvalue > 1e-3


# A draw beyond the 5.678 sigma that tl.randn can reach (found by benchmarks/noise_quality.py:
# seed 1, draw 81885978 = counter 20471494, lane 2).
FAR_TAIL = (1, 81885978, -5.9064)


def test_far_tail_draw(triton_path):
    seed, draw, value = FAR_TAIL
    z = K.randn(4, seed, draw - draw % 4, device=triton_path).cpu()
    assert abs(z[draw % 4].item() - value) < 1e-3 and abs(z[draw % 4].item()) > 5.678
    assert abs(stream_normal(seed, draw, 1)[0] - value) < 1e-3


if TRITON_DEVICE is not None:
    from diffmath.kernels._affine import FAST_MATH
    from diffmath.kernels._tile import box_muller

    @triton.jit
    def box_muller_probe(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
        """Writes _tile.box_muller of the uint32 pairs (a[i], b[i]) (passed as int32 bit patterns)."""
        i = tl.arange(0, BLOCK)
        m = i < n
        a = tl.load(a_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
        b = tl.load(b_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
        z0, z1 = box_muller(a, b, FAST)
        tl.store(out_ptr + 2 * i, z0, mask=m)
        tl.store(out_ptr + 2 * i + 1, z1, mask=m)


def test_uniform_resolution_reaches_far_tail(triton_path):
    """The kernel's uniform u = r0 2**-32 + 2**-33 is never 0 and reaches 2**-33: at r0 = 0 the
    radius is sqrt(66 log 2) = 6.76 (tl.randn's 31-bit uniform clamped at 1e-7 stops at 5.68);
    at r0 = 2**32 - 1 it rounds to 1 (radius 0). Drives _tile.box_muller, the map every
    in-kernel draw (randn, the fused steps) goes through."""
    r0 = np.array([0, 0, 1, 2**32 - 1], dtype=np.uint32)
    r1 = np.array([0, 2**30, 0, 0], dtype=np.uint32)  # theta = 0, pi/2
    out = torch.empty(2 * r0.size, dtype=torch.float32, device=triton_path)
    box_muller_probe[(1,)](
        torch.from_numpy(r0.view(np.int32)).to(triton_path),
        torch.from_numpy(r1.view(np.int32)).to(triton_path),
        out,
        r0.size,
        BLOCK=4,
        FAST=FAST_MATH,
    )
    z = out.cpu().numpy().reshape(-1, 2).astype(np.float64)
    rmax = math.sqrt(66 * math.log(2))
    assert np.isfinite(z).all()
    assert math.isclose(z[0, 0], rmax, rel_tol=1e-5) and abs(z[0, 1]) < 1e-5
    assert abs(z[1, 0]) < 1e-4 and math.isclose(z[1, 1], rmax, rel_tol=1e-5)
    assert math.isclose(z[2, 0], math.sqrt(-2 * math.log(1.5 * 2.0**-32)), rel_tol=1e-5)
    assert abs(z[3, 0]) < 1e-3 and abs(z[3, 1]) < 1e-3
    assert np.abs(z).max() <= rmax * (1 + 1e-5)


def test_torch_stream_seed_mixes_seed_and_offset():
    """The torch path seeds its generator with a 64-bit hash of (seed, offset); a CPU
    torch.Generator keeps the low 32 bits, which must differ too for these 4096 pairs."""
    seeds = [_common.stream_seed(s, o) for s in range(64) for o in range(64)]
    assert len(set(seeds)) == len({v & 0xFFFFFFFF for v in seeds}) == 64 * 64
    assert all(0 <= v < 2**64 for v in seeds)


def test_uint32_reference_covers_offsets():
    r, first = stream_uint32(5, 6, 3)
    assert r.shape == (2, 4) and first == 2
