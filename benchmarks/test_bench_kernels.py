"""pytest-benchmark suite for diffmath.kernels: every update x every implementation x size.

    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-group-by=group
    DIFFMATH_BENCH_COMPILE=0 ...    skip torch.compile (each compile takes ~10-30 s on a CPU)

Implementations (side_by_side.build_cases, in this folder): our Triton kernel (CUDA), our torch
fallback, the minimal eager torch expression, torch.compile of it, diffusers' step (if
installed). CPU runs are single-threaded (DIFFMATH_BENCH_THREADS). ``diffmath bench`` prints
the same comparison as one side-by-side table; numbers measured here are in RESULTS.md.
"""

import contextlib
import os

import pytest
import torch
from side_by_side import IMPLS, OPS, Deferred, _path, build_cases, sizes_for, stable_cpu_allocator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = sizes_for(DEVICE)
if DEVICE == "cpu":
    torch.set_num_threads(int(os.environ.get("DIFFMATH_BENCH_THREADS", "1")))
    stable_cpu_allocator()


@pytest.fixture(scope="module", params=SIZES, ids=[label for label, _ in SIZES])
def size(request):
    label, shape = request.param
    return label, build_cases(shape, DEVICE, with_compile=os.environ.get("DIFFMATH_BENCH_COMPILE", "1") != "0")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, size, op, impl):
    label, cases = size
    case = cases[op][impl]
    if isinstance(case, Deferred):
        case = cases[op][impl] = case()  # compile now, once per size
    if case is None:
        pytest.skip(f"no {impl} implementation of {op} on {DEVICE}")
    if isinstance(case, str):
        pytest.skip(case)
    p, fn = case
    benchmark.group = f"{op} {label}"
    benchmark.extra_info.update(device=DEVICE, impl=impl)
    if DEVICE == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

    else:
        run = fn
    with _path(p) if p else contextlib.nullcontext():
        benchmark(run)
