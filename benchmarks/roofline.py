"""Roofline check for the fused kernels on a CUDA GPU.

    python benchmarks/roofline.py [--log2n 24 26] [--dtype float32 bfloat16]

Measures the device's copy bandwidth (``y.copy_(x)``, 2 * 4 bytes per float32 element), then
for each kernel at n = 2^24 (and more) elements counts the minimum bytes it must move (every
input read once, the output written once; the noise is drawn in the kernel, so it costs no
bytes; tables and per-sample coefficients are negligible) and reports the achieved bandwidth
bytes / time as a percentage of the copy bandwidth. Target: >= 85 % at >= 2^24 elements.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def cuda_time(fn, reps=50, warmup=5):
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(out)


def kernels(n, dtype, dev="cuda"):
    """(name, fn, bytes moved at minimum) for the Triton path on n elements (shape (B, n/B))."""
    import diffmath as dm
    import diffmath.kernels as K
    from diffmath.sde import VPSDE

    B = 64
    shape = (B, n // B)
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(shape, device=dev).to(dtype)
    m = torch.randn(shape, device=dev).to(dtype)
    z = torch.randn(shape, device=dev).to(dtype)
    s = dm.linear_schedule(1000)
    t = torch.randint(0, 1000, (B,), device=dev)
    sde = VPSDE()
    pred = m.clone().requires_grad_(True)
    loss = K.simple_loss(pred, 1)
    g1 = torch.ones((), device=dev)
    return [
        ("randn", lambda: K.randn(shape, 1, 0, device=dev, dtype=dtype), 1 * es * n),
        ("q_sample seed, t (B,)", lambda: K.q_sample(s, x, t, seed=1), 2 * es * n),
        ("q_sample noise=", lambda: K.q_sample(s, x, t, noise=z), 3 * es * n),
        ("ddpm_step seed, clip", lambda: K.ddpm_step(s, x, 500, m, seed=1, clip_x0=1.0), 3 * es * n),
        ("ddpm_step seed, t (B,)", lambda: K.ddpm_step(s, x, t, m, seed=1), 3 * es * n),
        ("ddim_step eta=0", lambda: K.ddim_step(s, x, 501, 481, m), 3 * es * n),
        ("ddim_step eta=1 seed", lambda: K.ddim_step(s, x, 501, 481, m, seed=1, eta=1.0), 3 * es * n),
        ("euler_maruyama_step seed", lambda: K.euler_maruyama_step(sde, x, 0.5, -1e-3, m, seed=1), 3 * es * n),
        ("langevin_step seed", lambda: K.langevin_step(x, m, 1e-3, seed=1), 3 * es * n),
        ("simple_loss forward", lambda: K.simple_loss(pred.detach(), 1), 1 * es * n),
        ("simple_loss backward", lambda: torch.autograd.grad(loss, pred, g1, retain_graph=True), 2 * es * n),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, nargs="+", default=[24, 26])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("roofline: no CUDA device here; the roofline needs a GPU (the CPU numbers are in benchmarks/RESULTS.md)")
        return 0
    import os

    os.environ["DIFFMATH_KERNELS"] = "triton"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for log2n in args.log2n:
        n = 1 << log2n
        src = torch.empty(n, device="cuda")
        dst = torch.empty_like(src)
        t_copy = cuda_time(lambda dst=dst, src=src: dst.copy_(src))
        bw = 8 * n / t_copy
        print(f"\nn = 2^{log2n}: copy bandwidth {bw / 1e9:.0f} GB/s ({t_copy * 1e6:.0f} us for {8 * n / 1e6:.0f} MB)")
        src = dst = None  # free before the kernels allocate
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            print(f"  {dtype_name}:")
            print(f"  {'kernel':28s} {'us':>9s} {'min MB':>8s} {'GB/s':>7s} {'% copy':>7s}")
            for name, fn, nbytes in kernels(n, dtype):
                t = cuda_time(fn)
                print(
                    f"  {name:28s} {t * 1e6:9.1f} {nbytes / 1e6:8.1f} {nbytes / t / 1e9:7.0f} "
                    f"{100 * nbytes / t / bw:6.1f}%"
                )
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
