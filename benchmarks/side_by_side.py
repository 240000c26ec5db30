"""Side-by-side timings of the fused kernels (``diffmath bench``; ``make bench``).

    python benchmarks/side_by_side.py [--quick]        (the same as ``diffmath bench``)

``diffmath bench`` runs this file from the source checkout the package is installed from
(``pip install -e .``); benchmarks/ is not part of the installed package.

For each update and tensor size, in one run: our Triton kernel (CUDA only), our torch
fallback (``DIFFMATH_KERNELS=torch``), the minimal eager torch expression of the same math
(precomputed float32 tables or python-float coefficients, ``torch.randn_like`` for the noise),
``torch.compile`` of that expression, and diffusers' step as the peer when diffusers is
installed (``pip install diffmath[bench]``). Medians in microseconds, then the ratios the
targets are stated in (each the median of per-round ratios: the implementations are timed
interleaved, round by round, so slow periods of a shared machine hit both sides of a ratio):

    fb/eager   our torch path / minimal eager            (CPU target <= 1.1)
    peer/fb    diffusers / our torch path                (CPU target >= 2)
    peer/kern  diffusers / our kernel                    (GPU target >= 5)
    comp/kern  torch.compile / our kernel                (GPU target >= 1.5)

CPU timings run single-threaded by default (``DIFFMATH_BENCH_THREADS``) so that numbers on a
shared machine are stable. ``benchmarks/test_bench_kernels.py`` times the same cases with
pytest-benchmark; ``benchmarks/roofline.py`` reports achieved bandwidth on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import diffmath as dm
from diffmath.kernels import ddim_step, ddpm_step, euler_maruyama_step, langevin_step, q_sample, simple_loss

__all__ = ["main", "run", "Deferred", "build_cases", "IMPLS", "OPS", "sizes_for", "time_fn", "time_cases", "run_case"]

IMPLS = ("kernel", "fallback", "eager", "compile", "diffusers")
OPS = ("q_sample", "ddpm_step", "ddim_step", "ddim_step_eta1", "euler_maruyama_step", "langevin_step", "simple_loss")
PEERS = {
    "q_sample": "add_noise + randn_like",
    "ddpm_step": "DDPMScheduler.step",
    "ddim_step": "DDIMScheduler.step",
    "ddim_step_eta1": "DDIMScheduler.step(eta=1)",
    "euler_maruyama_step": "EulerDiscreteScheduler.step",
}


def sizes_for(device: str, quick: bool = False):
    """(label, shape) pairs: the two latent/image sizes and one large size (2^22 elements on
    CPU, 2^24 on CUDA)."""
    big = (256, 4, 128, 128) if device == "cuda" else (64, 4, 128, 128)
    sizes = [("4x4x64x64", (4, 4, 64, 64)), ("16x3x64x64", (16, 3, 64, 64))]
    return sizes if quick else sizes + [("x".join(map(str, big)), big)]


@contextlib.contextmanager
def _path(p):
    old = os.environ.get("DIFFMATH_KERNELS")
    os.environ["DIFFMATH_KERNELS"] = p
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DIFFMATH_KERNELS", None)
        else:
            os.environ["DIFFMATH_KERNELS"] = old


def _diffusers():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers  # noqa: F401
            from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
            from diffusers.utils import logging as dlog

            dlog.set_verbosity_error()
        return DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler
    except Exception:
        return None


class Deferred:
    """A case built on demand: torch.compile runs only when its timing starts, after the other
    implementations were timed (compiling starts worker processes that would load the CPU)."""

    def __init__(self, build):
        self.build = build

    def __call__(self):
        return self.build()


def build_cases(shape, device, *, with_compile=True):
    """{op: {impl: (path, zero-argument callable) | None | reason | Deferred}} for one shape on
    one device. Every callable computes the update once; "kernel" and "fallback" run with
    DIFFMATH_KERNELS = triton / torch (``time_cases`` sets it); "compile" entries are
    ``Deferred`` (call to compile)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device)
    m = torch.randn(shape, generator=gen, device=device)
    B = shape[0]
    s = dm.linear_schedule(1000)
    f32 = dict(dtype=torch.float32, device=device)
    sa, s1m = torch.tensor(s.sqrt_alphas_cumprod, **f32), torch.tensor(s.sqrt_one_minus_alphas_cumprod, **f32)
    t_batch = torch.randint(0, 1000, (B,), generator=gen, device=device)
    t, tp = 501, 481  # a 50-step DDIM step (leading spacing + 1), and t for DDPM
    sde = _vpsde()
    ts, dt = 0.5, -1e-3
    a_t, g_t = float(sde.linear_drift_coef(ts)), float(sde.diffusion_coef(ts))
    h = 1e-3
    pred = m.clone().requires_grad_(True)

    # -- the minimal eager expressions (what one writes by hand with the same float64-derived constants)
    sra, srm1 = float(s.sqrt_recip_alphas_cumprod[t]), float(s.sqrt_recipm1_alphas_cumprod[t])
    c1, c2 = float(s.posterior_mean_coef1[t]), float(s.posterior_mean_coef2[t])
    std = math.exp(0.5 * float(s.posterior_log_variance_clipped[t]))
    ab_t, ab_p = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[tp])
    sig1 = math.sqrt((1 - ab_p) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_p)

    def eager_q(x0, tt):
        return sa[tt].view(-1, 1, 1, 1) * x0 + s1m[tt].view(-1, 1, 1, 1) * torch.randn_like(x0)

    def eager_ddpm(xt, eps):
        x0 = (sra * xt - srm1 * eps).clamp(-1.0, 1.0)
        return c1 * x0 + c2 * xt + std * torch.randn_like(xt)

    def eager_ddim(xt, eps):
        x0 = (xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        return math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p) * eps

    def eager_ddim1(xt, eps):
        x0 = (xt - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        return math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p - sig1**2) * eps + sig1 * torch.randn_like(xt)

    def eager_em(xx, score):
        return xx + (a_t * xx - g_t * g_t * score) * dt + g_t * math.sqrt(-dt) * torch.randn_like(xx)

    def eager_langevin(xx, score):
        return xx + 0.5 * h * score + math.sqrt(h) * torch.randn_like(xx)

    def eager_loss(p):  # the same math: the noise drawn again, then the MSE
        return F.mse_loss(p, torch.randn_like(p))

    eager = {
        "q_sample": (eager_q, (x, t_batch)),
        "ddpm_step": (eager_ddpm, (x, m)),
        "ddim_step": (eager_ddim, (x, m)),
        "ddim_step_eta1": (eager_ddim1, (x, m)),
        "euler_maruyama_step": (eager_em, (x, m)),
        "langevin_step": (eager_langevin, (x, m)),
    }
    ours = {
        "q_sample": lambda: q_sample(s, x, t_batch, seed=1, offset=0),
        "ddpm_step": lambda: ddpm_step(s, x, t, m, seed=1, clip_x0=1.0),
        "ddim_step": lambda: ddim_step(s, x, t, tp, m),
        "ddim_step_eta1": lambda: ddim_step(s, x, t, tp, m, seed=1, eta=1.0),
        "euler_maruyama_step": lambda: euler_maruyama_step(sde, x, ts, dt, m, seed=1),
        "langevin_step": lambda: langevin_step(x, m, h, seed=1),
        "simple_loss": lambda: torch.autograd.grad(simple_loss(pred, 1, 0), pred)[0],
    }
    cases = {}
    for op in OPS:
        c = {impl: None for impl in IMPLS}
        c["fallback"] = ("torch", ours[op])
        if device == "cuda":
            c["kernel"] = ("triton", ours[op])
        if op == "simple_loss":
            c["eager"] = (None, lambda: torch.autograd.grad(eager_loss(pred), pred)[0])
            if with_compile:
                c["compile"] = Deferred(lambda: _compiled_grad(eager_loss, pred))
        else:
            fn, args = eager[op]
            c["eager"] = (None, lambda fn=fn, args=args: fn(*args))
            if with_compile:
                c["compile"] = Deferred(lambda fn=fn, args=args: _compiled(fn, args))
        cases[op] = c
    _add_peers(cases, x, m, t, t_batch, device)
    return cases


def _vpsde():
    from diffmath.sde import VPSDE

    return VPSDE()


def _compiled(fn, args):
    """(None, torch.compile(fn) warmed up on args), or a string saying why not."""
    try:
        cf = torch.compile(fn, dynamic=False)
        cf(*args)
        return None, lambda: cf(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"compile failed: {type(e).__name__}"


def _compiled_grad(fn, p):
    try:
        cf = torch.compile(fn, dynamic=False)
        torch.autograd.grad(cf(p), p)
        return None, lambda: torch.autograd.grad(cf(p), p)[0]
    except Exception as e:  # noqa: BLE001
        return f"compile failed: {type(e).__name__}"


def _add_peers(cases, x, m, t, t_batch, device):
    d = _diffusers()
    if d is None:
        return
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler = d
    gen = torch.Generator(device=device).manual_seed(1)
    ddpm = DDPMScheduler(num_train_timesteps=1000)  # clip_sample=True, fixed_small: as ddpm_step(clip_x0=1)
    ddpm.set_timesteps(1000)
    ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    ddim.set_timesteps(50)
    euler = EulerDiscreteScheduler(num_train_timesteps=1000)
    euler.set_timesteps(50)
    et = euler.timesteps[25]

    def euler_step():
        euler._step_index = 25  # a mid-trajectory step; the scheduler advances it on each call
        return euler.step(m, et, x, generator=gen).prev_sample

    cases["q_sample"]["diffusers"] = (None, lambda: ddpm.add_noise(x, torch.randn_like(x), t_batch))
    cases["ddpm_step"]["diffusers"] = (None, lambda: ddpm.step(m, t, x, generator=gen).prev_sample)
    cases["ddim_step"]["diffusers"] = (None, lambda: ddim.step(m, t, x, eta=0.0).prev_sample)
    cases["ddim_step_eta1"]["diffusers"] = (None, lambda: ddim.step(m, t, x, eta=1.0, generator=gen).prev_sample)
    cases["euler_maruyama_step"]["diffusers"] = (None, euler_step)


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _calls_per_batch(fn, sync, min_batch_s, warmup):
    """Warm ``fn`` up, time one call and return how many calls make a batch of >= min_batch_s."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return max(1, int(min_batch_s / max(time.perf_counter() - t0, 1e-7)))


def time_fn(fn, device, *, min_batch_s=2e-3, batches=15, warmup=3):
    """Median seconds per call: batches of k calls (k chosen so a batch takes >= min_batch_s),
    synchronised on CUDA, median over batches."""
    sync = _sync(device)
    k = _calls_per_batch(fn, sync, min_batch_s, warmup)
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / k)
    return statistics.median(out)


def run_case(case, device, **kw):
    """Median seconds per call of one (path, fn) case, or the string explaining its absence."""
    if case is None or isinstance(case, str):
        return case
    p, fn = case
    with _path(p) if p else contextlib.nullcontext():
        return time_fn(fn, device, **kw)


def time_cases(cases, device, *, min_batch_s=2e-3, rounds=15, warmup=3, raw=None):
    """Median seconds per call of every case of one op, the implementations interleaved round
    by round (so that load from other processes on a shared machine hits all of them alike).
    Entries that are None or strings are passed through; Deferred ones are left out. ``raw``:
    a dict that receives the per-round times (for paired ratios)."""
    sync = _sync(device)
    cases = {k: c for k, c in cases.items() if not isinstance(c, Deferred)}
    live = {k: c for k, c in cases.items() if c is not None and not isinstance(c, str)}
    ks, times = {}, {k: [] for k in live}
    for name, (p, fn) in live.items():
        with _path(p) if p else contextlib.nullcontext():
            ks[name] = _calls_per_batch(fn, sync, min_batch_s, warmup)
    for _ in range(rounds):
        for name, (p, fn) in live.items():
            with _path(p) if p else contextlib.nullcontext():
                t0 = time.perf_counter()
                for _ in range(ks[name]):
                    fn()
                sync()
                times[name].append((time.perf_counter() - t0) / ks[name])
    if raw is not None:
        raw.update(times)
    return {k: (statistics.median(times[k]) if k in live else c) for k, c in cases.items()}


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return "n/a"
    return f"{v * 1e6:.0f}" if v * 1e6 >= 10 else f"{v * 1e6:.1f}"


def _ratio(r, raw, a, b):
    """a / b: the median of the per-round ratios when both were timed in the same rounds (robust
    to slow periods of a shared machine, which hit both), else the ratio of the medians."""
    if a in raw and b in raw and len(raw[a]) == len(raw[b]):
        return statistics.median(x / y for x, y in zip(raw[a], raw[b]))
    va, vb = r.get(a), r.get(b)
    if isinstance(va, float) and isinstance(vb, float) and vb > 0:
        return va / vb
    return None


def _fr(v):
    return "-" if v is None else f"{v:.2f}"


def stable_cpu_allocator() -> bool:
    """Keep freed CPU buffers in glibc's heap (mmap threshold 32 MiB, no trimming). With the
    defaults, buffers of a few hundred KiB go back and forth to the OS and each call pays page
    faults at random, depending on the history of earlier allocations; on this machine that made
    a random implementation 3-5x slower per run. A warm allocator is what a training loop sees."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(
            libc.mallopt(-1, 1 << 30)
        )  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads = {torch.get_num_threads()}"


def main(quick: bool = False, device: str | None = None) -> int:
    """``diffmath bench``: print the side-by-side table (``quick``: two sizes, fewer repeats,
    no torch.compile on CPU). Returns the exit status 0."""
    run(quick, device)
    return 0


def run(quick: bool = False, device: str | None = None) -> dict:
    """Print the table and return {(op, size label): {impl: median seconds | None | reason}}."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    warm = False
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("DIFFMATH_BENCH_THREADS", "1")))
        warm = stable_cpu_allocator()
    with_compile = not (quick and device == "cpu")
    d = _diffusers()
    print(f"diffmath.kernels benchmark on {device}: {device_name(device)}")
    print(
        f"torch {torch.__version__}, diffusers "
        f"{'not installed' if d is None else __import__('diffusers').__version__}; "
        f"median microseconds per call{'; quick' if quick else ''}"
    )
    if warm:
        print("glibc malloc kept warm (mmap threshold 32 MiB, no trim): see stable_cpu_allocator")
    if not with_compile:
        print("torch.compile skipped on CPU in --quick mode")
    head = f"{'op':22s} {'size':14s} " + " ".join(f"{i:>9s}" for i in IMPLS)
    head += f" {'fb/eager':>9s} {'peer/fb':>8s} {'peer/kern':>9s} {'comp/kern':>9s}  peer"
    print(head)
    print("-" * len(head))
    kw = dict(rounds=9, min_batch_s=1e-3) if quick else dict(rounds=41, min_batch_s=1e-3)
    results = {}
    for label, shape in sizes_for(device, quick):
        cases = build_cases(shape, device, with_compile=with_compile)
        for op in OPS:  # warm every case (allocator, caches, lazily built tables) before timing any
            time_cases(cases[op], device, rounds=2, min_batch_s=1e-4)
        raws = {op: {} for op in OPS}
        rs = {op: time_cases(cases[op], device, raw=raws[op], **kw) for op in OPS}
        for op in OPS:  # compile last (see Deferred)
            c = cases[op]["compile"]
            rs[op]["compile"] = time_cases({"compile": c()}, device, **kw)["compile"] if isinstance(c, Deferred) else c
        for op in OPS:
            r, raw = rs[op], raws[op]
            ratios = {
                "fb/eager": _ratio(r, raw, "fallback", "eager"),
                "peer/fb": _ratio(r, raw, "diffusers", "fallback"),
                "peer/kern": _ratio(r, raw, "diffusers", "kernel"),
                "comp/kern": _ratio(r, raw, "compile", "kernel"),
            }
            results[(op, label)] = dict(r, **ratios)
            line = f"{op:22s} {label:14s} " + " ".join(f"{_fmt(r[i]):>9s}" for i in IMPLS)
            line += f" {_fr(ratios['fb/eager']):>9s} {_fr(ratios['peer/fb']):>8s}"
            line += f" {_fr(ratios['peer/kern']):>9s} {_fr(ratios['comp/kern']):>9s}  {PEERS.get(op, '-')}"
            print(line, flush=True)
            for impl in IMPLS:
                if isinstance(r[impl], str):
                    print(f"    {impl}: {r[impl]}")
    return results


if __name__ == "__main__":  # pragma: no cover - a command-line entry
    import argparse

    ap = argparse.ArgumentParser(description="Time the fused kernels against the torch reference paths.")
    ap.add_argument("--quick", action="store_true", help="a short run (small sizes, few repeats)")
    sys.exit(main(quick=ap.parse_args().quick))
