"""Noise-quality investigation: Triton's tl.randn against diffmath.kernels' own Box-Muller.

    python benchmarks/noise_quality.py [--quick]          (CPU: numpy references only)
    TRITON_INTERPRET=1 python benchmarks/noise_quality.py  (also checks the references against
                                                            the real tl.randn and our kernel)

Both streams use the same Philox4x32-10 bits; they differ in the uint32 -> normal transform.
The script prints: the KS p-values of seeds 0..8 (the "quick look"), a second-level KS test of
the p-values over many seeds, one-sample statistics of a large sample (moments, KS distance
on a fine grid, tail counts), the exact extremes of both transforms, and a (seed, counter)
whose draw lies beyond tl.randn's reach (used by tests/kernels/test_kernel_noise.py).
Results are recorded in docs/kernels.md ("Noise quality").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from _kernel_ref import philox4x32_10, stream_normal, tl_randn_reference  # noqa: E402

STREAMS = {"tl.randn": tl_randn_reference, "diffmath": stream_normal}


def check_references_against_triton():
    """The numpy references reproduce tl.randn and our kernel (needs a Triton path)."""
    import torch

    os.environ.setdefault("DIFFMATH_KERNELS", "triton")
    try:
        import triton
        import triton.language as tl

        import diffmath.kernels as K
    except Exception as e:  # pragma: no cover
        print("  (skipped: no Triton)", e)
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("  (skipped: set TRITON_INTERPRET=1 or use a GPU to compare with the kernels)")
        return

    @triton.jit
    def _tl_randn(out_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.randn(seed, i), mask=i < n)

    n = 100_000
    for seed in (0, 1, 2):
        out = torch.empty(n, device=dev)
        _tl_randn[(triton.cdiv(n, 1024),)](out, seed, n, BLOCK=1024)
        d1 = np.abs(out.cpu().double().numpy() - tl_randn_reference(seed, 0, n)).max()
        z = K.randn(n, seed, 0, device=dev).cpu().double().numpy()
        d2 = np.abs(z - stream_normal(seed, 0, n)).max()
        print(f"  seed {seed}: max |tl.randn - reference| = {d1:.2e}; max |kernel - reference| = {d2:.2e}")


def quick_look(n=100_000):
    for name, f in STREAMS.items():
        ps = [stats.kstest(np.asarray(f(s, 0, n), np.float64), "norm").pvalue for s in range(9)]
        print(f"  {name:9s} seeds 0..8, {n} draws: KS p = " + " ".join(f"{p:.4f}" for p in ps))


def second_level(seeds, n=100_000):
    for name, f in STREAMS.items():
        t0 = time.time()
        ps = np.array([stats.kstest(np.asarray(f(s, 0, n), np.float64), "norm").pvalue for s in range(seeds)])
        p2 = stats.kstest(ps, "uniform").pvalue
        print(
            f"  {name:9s} {seeds} seeds x {n}: second-level KS p = {p2:.3f}; fraction p < 0.01: "
            f"{np.mean(ps < 0.01):.3f}, "
            f"p < 0.05: {np.mean(ps < 0.05):.3f}; min p = {ps.min():.2e} ({time.time() - t0:.0f} s)"
        )


def big_sample(n_total, chunk=1 << 22):
    edges = np.linspace(-6.0, 6.0, 12001)
    for name, f in STREAMS.items():
        t0 = time.time()
        counts = np.zeros(edges.size - 1)
        below = above = 0
        s1 = s2 = s3 = s4 = 0.0
        tails = {4.0: 0, 4.5: 0, 5.0: 0, 5.5: 0}
        zmax = 0.0
        for k in range(n_total // chunk):
            z = np.asarray(f(7, k * chunk, chunk), np.float64)
            counts += np.histogram(z, edges)[0]
            below += int((z < edges[0]).sum())
            above += int((z >= edges[-1]).sum())
            s1, s2, s3, s4 = s1 + z.sum(), s2 + (z**2).sum(), s3 + (z**3).sum(), s4 + (z**4).sum()
            az = np.abs(z)
            zmax = max(zmax, float(az.max()))
            for t in tails:
                tails[t] += int((az > t).sum())
        n = n_total
        mean, var = s1 / n, s2 / n - (s1 / n) ** 2
        ecdf = (below + np.cumsum(counts)) / n
        d = np.max(np.abs(ecdf - stats.norm.cdf(edges[1:])))
        p_ks = stats.kstwo.sf(d, n)
        print(
            f"  {name:9s} n = 2^{int(math.log2(n))}: mean {mean:+.2e} (se {1 / math.sqrt(n):.1e}), var - 1 = "
            f"{var - 1:+.2e} "
            f"(se {math.sqrt(2 / n):.1e}), skew {s3 / n:+.2e}, E z^4 - 3 = {s4 / n - 3:+.2e} (se "
            f"{math.sqrt(96 / n):.1e}); "
            f"grid KS D = {d:.2e} (p ~ {p_ks:.2f}); max |z| = {zmax:.3f} ({time.time() - t0:.0f} s)"
        )
        line = ", ".join(
            f">{t}: {c} (exp {2 * stats.norm.sf(t) * n:.1f}, p "
            f"{stats.binomtest(c, n, 2 * stats.norm.sf(t)).pvalue:.2f})"
            for t, c in tails.items()
        )
        print(f"            tails |z| {line}")


def extremes():
    # tl.randn: u1 = float32(x) * 4.6566127342e-10, x in [0, 2**31) (sign folded), u1 >= 1e-7.
    scale = np.float32(4.6566127342e-10)
    x = np.arange(0, 1000, dtype=np.int32)
    u = np.maximum(np.float32(1e-7), x.astype(np.float32) * scale)
    clamped = int((x.astype(np.float32) * scale < np.float32(1e-7)).sum())
    r_max = math.sqrt(-2 * math.log(1e-7))
    print(
        f"  tl.randn: 31-bit uniform, clamp u >= 1e-7 catches {clamped} of 2^31 values (P = {clamped / 2**31:.3e}); "
        f"max radius sqrt(-2 log 1e-7) = {r_max:.4f}; P(|N(0,1)| > {r_max:.3f}) = {2 * stats.norm.sf(r_max):.2e} "
        f"is never drawn and P(R > {r_max:.3f}) = {math.exp(-(r_max**2) / 2):.2e} is piled onto R = {r_max:.3f}"
    )
    del u
    r_ours = math.sqrt(-2 * math.log(2.0**-33))
    print(
        f"  diffmath: 32-bit uniform u = (r + 1/2) 2^-32 >= 2^-33, no clamp; max radius {r_ours:.4f}; "
        f"P(|N(0,1)| > {r_ours:.2f}) = {2 * stats.norm.sf(r_ours):.1e}; radius CDF exact to 2^-32 per step"
    )


def find_far_tail(seed=1, threshold=5.7, max_calls=1 << 27, chunk=1 << 22):
    """A counter whose lane beyond `threshold` sigma (tl.randn never exceeds 5.678)."""
    t0 = time.time()
    for start in range(0, max_calls, chunk):
        z = stream_normal(seed, 4 * start, 4 * chunk)
        idx = np.flatnonzero(np.abs(z) > threshold)
        if idx.size:
            d = 4 * start + int(idx[0])
            print(
                f"  seed {seed}: draw {d} (counter {d // 4}, lane {d % 4}) = {z[idx[0]]:+.4f} "
                f"({time.time() - t0:.0f} s)"
            )
            return seed, d
    print("  none found")
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print("Philox4x32-10 reference, Random123 KAT 0:", [hex(int(v)) for v in philox4x32_10(0, 0, 0, 0, 0, 0)])
    print("1. references against the real kernels")
    check_references_against_triton()
    print("2. the quick look (KS against N(0,1), 1e5 draws per seed)")
    quick_look()
    print("3. second-level test over seeds")
    second_level(200 if args.quick else 1000)
    print("4. one large sample")
    big_sample(1 << (24 if args.quick else 27))
    print("5. extremes of the transforms")
    extremes()
    print("6. a draw beyond 5.7 sigma in the diffmath stream")
    find_far_tail()


if __name__ == "__main__":
    main()
