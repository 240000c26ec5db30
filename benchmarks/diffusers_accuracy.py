"""diffusers' schedulers and diffmath's adapters against 50-digit mpmath, all eight classes.

    .venv/bin/python benchmarks/diffusers_accuracy.py            (about 4 minutes on 2 cores)

Prints the tables of docs/diffusers.md: for each configuration, the worst norm-wise relative
error ||out - ref|| / ||ref|| of one step over every timestep of the grid, for diffusers'
class (float32, its native precision), the adapter fed float32 tensors (result rounded to
float32) and the adapter fed float64 tensors; then the error of the alphas_cumprod tables.
DDPM / DDIM: the inputs are x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with x0, eps ~ N(0, 1)
(seeded) and the true eps (or v, or x0) as the model output, so every step is the one a
perfect model meets. The six sigma-space classes (Euler, Euler ancestral, Heun, LMS,
DPM-Solver++ 2M, UniPC): every call of a loop, the multistep history included, each call fed
its own float32 (x0 + sigma eps, eps) pair, against tests/reference/_mpref_sigma.py's mpmath loop on the
config's exact ladder (a few seconds of the total).
"""

from __future__ import annotations

import os
import sys

import mpmath as mp
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))

import diffusers  # noqa: E402
from _mpref_diffusers import ddim_step, ddpm_step, rel_error  # noqa: E402
from _mpref_sigma import step_errors as sigma_step_errors  # noqa: E402

from diffmath.integrations import diffusers as dm  # noqa: E402

SHAPE = (2, 3, 4, 4)


def inputs(sched, t, prediction, gen):
    """float64 (x_t, model output) at step t, from the float64 schedule."""
    s = sched.schedule
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    a, b = float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t])
    x = a * x0 + b * eps
    m = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction]
    return x, m


def step_errors(kind, config, steps, eta=0.0, seed=0):
    """Worst step error over the grid for (diffusers fp32, adapter fp32, adapter fp64)."""
    cls_d = getattr(diffusers, kind)
    cls_a = getattr(dm, kind)
    cd, ca = cls_d(**config), cls_a(**config)
    if steps is not None:
        cd.set_timesteps(steps)
        ca.set_timesteps(steps)
    ts = ca.timesteps.tolist()
    betas = ca.schedule.betas
    pred = config.get("prediction_type", "epsilon")
    gen = torch.Generator().manual_seed(seed)
    worst = [0.0, 0.0, 0.0]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, m = inputs(ca, t, pred, gen)
        x32, m32 = x.float(), m.float()
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64).float()
        for j, (sch, xi, mi) in enumerate(((cd, x32, m32), (ca, x32, m32), (ca, x, m))):
            kw = {}
            if kind == "DDIMScheduler":
                kw = dict(eta=eta, variance_noise=noise.to(xi.dtype) if eta else None)
                out = sch.step(mi, t, xi, **kw).prev_sample
                ref, _ = ddim_step(betas, xi, mi, t, t_prev, eta=eta, noise=noise if eta else None, prediction=pred)
            else:
                g = torch.Generator().manual_seed(1000 + i)
                out = sch.step(mi, t, xi, generator=g).prev_sample
                z = (
                    torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i), dtype=mi.dtype)
                    if t > 0
                    else None
                )
                ref, _ = ddpm_step(
                    betas,
                    xi,
                    mi,
                    t,
                    t_prev,
                    noise=z,
                    variance=config.get("variance_type", "fixed_small"),
                    prediction=pred,
                )
            worst[j] = max(worst[j], rel_error(out, ref))
    return worst


def table_errors(config):
    cd, ca = diffusers.DDPMScheduler(**config), dm.DDPMScheduler(**config)
    T = ca.schedule.num_timesteps
    worst_d = worst_a = 0.0
    with mp.workdps(50):
        p = mp.mpf(1)
        for t in range(T):
            p *= 1 - mp.mpf(float(ca.schedule.betas[t]))
            worst_d = max(worst_d, float(abs(mp.mpf(float(cd.alphas_cumprod[t])) / p - 1)))
            worst_a = max(worst_a, float(abs(mp.mpf(float(ca.schedule.alphas_cumprod[t])) / p - 1)))
    return worst_d, worst_a


CASES = [
    ("DDPMScheduler", "linear, full chain (1000 steps)", dict(clip_sample=False), None, 0.0),
    ("DDPMScheduler", "linear, 50 leading steps", dict(clip_sample=False), 50, 0.0),
    (
        "DDPMScheduler",
        "scaled_linear, 50 leading, v",
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            prediction_type="v_prediction",
        ),
        50,
        0.0,
    ),
    (
        "DDPMScheduler",
        "cosine, 50 leading, fixed_large",
        dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_large"),
        50,
        0.0,
    ),
    ("DDIMScheduler", "linear, 50 leading, eta 0", dict(clip_sample=False), 50, 0.0),
    ("DDIMScheduler", "linear, 50 leading, eta 1", dict(clip_sample=False), 50, 1.0),
    (
        "DDIMScheduler",
        "scaled_linear, 50 leading, eta 0",
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        50,
        0.0,
    ),
    (
        "DDIMScheduler",
        "cosine, 50 leading, v, eta 0",
        dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="v_prediction"),
        50,
        0.0,
    ),
]

# the six sigma-space classes: every call of a loop (multistep history included) against the
# mpmath loop of tests/reference/_mpref_sigma.py on the config's exact ladder (linspace spacing)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SIGMA_CASES = [
    ("EulerDiscreteScheduler", "linear, 10 linspace steps", {}, 10),
    ("EulerDiscreteScheduler", "scaled_linear, 25 linspace steps", SD, 25),
    ("EulerAncestralDiscreteScheduler", "linear, 10 linspace steps", {}, 10),
    ("EulerAncestralDiscreteScheduler", "scaled_linear, 25 linspace steps", SD, 25),
    ("HeunDiscreteScheduler", "linear (0.00085, 0.012), 10 linspace levels", {}, 10),
    ("HeunDiscreteScheduler", "scaled_linear, 25 linspace levels", SD, 25),
    ("LMSDiscreteScheduler", "linear, 10 linspace steps, order 4", {}, 10),
    ("LMSDiscreteScheduler", "scaled_linear, 25 linspace steps, order 4", SD, 25),
    ("DPMSolverMultistepScheduler", "linear, 10 linspace steps, 2M", {}, 10),
    ("DPMSolverMultistepScheduler", "scaled_linear, 25 linspace steps, 2M", SD, 25),
    ("UniPCMultistepScheduler", "linear, 10 linspace steps, bh2 order 2", {}, 10),
    ("UniPCMultistepScheduler", "scaled_linear, 25 linspace steps, bh2 order 2", SD, 25),
    ("UniPCMultistepScheduler", "linear, 20 linspace steps, bh2 order 3", dict(solver_order=3), 20),
]


def main():
    print("| scheduler | configuration | diffusers (fp32) | adapter, fp32 in/out | adapter, fp64 |")
    print("|---|---|---|---|---|")
    for kind, label, config, steps, eta in CASES:
        d, a32, a64 = step_errors(kind, config, steps, eta)
        print(f"| {kind} | {label} | {d:.1e} | {a32:.1e} | {a64:.1e} |")
    for kind, label, config, steps in SIGMA_CASES:
        d, a32, a64 = sigma_step_errors(
            kind,
            config,
            steps,
            shape=SHAPE,
            classes=(
                (getattr(diffusers, kind), torch.float32),
                (getattr(dm, kind), torch.float32),
                (getattr(dm, kind), torch.float64),
            ),
        )
        print(f"| {kind} | {label} | {d:.1e} | {a32:.1e} | {a64:.1e} |")
    print()
    print("| alphas_cumprod (T = 1000) | diffusers (fp32 cumprod) | adapter (float64) |")
    print("|---|---|---|")
    for label, config in (
        ("linear", {}),
        ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("squaredcos_cap_v2", dict(beta_schedule="squaredcos_cap_v2")),
    ):
        d, a = table_errors(config)
        print(f"| {label} | {d:.1e} | {a:.1e} |")


# ----------------------------------------------------------------------------- diffusers' full-loop tests
def _deter(flip=False):
    """diffusers' dummy_sample_deter / dummy_noise_deter (tests/schedulers/test_schedulers.py)."""
    n = 4 * 3 * 8 * 8
    a = torch.arange(n)
    a = a.flip(-1) if flip else a
    return (a.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def _mp_loop(kind, config, steps, t_start, noises, dps=40):
    """The loop of diffusers' full-loop tests in mpmath: exact betas from the config, the dummy
    model m = x t / (t + 1), DDPM over every step (noise = the float32 draws the test makes)
    or DDIM (eta 0) on the leading grid; returns sum |x|."""
    with mp.workdps(dps):
        T = 1000
        bs, be = mp.mpf(config.get("beta_start", "0.0001")), mp.mpf("0.02")
        betas = [bs + (be - bs) * i / (T - 1) for i in range(T)]
        ab, p = [], mp.mpf(1)
        for b in betas:
            p *= 1 - b
            ab.append(p)
        pred = config.get("prediction_type", "epsilon")
        x = [mp.mpf(v) for v in _deter().reshape(-1).tolist()]
        if kind == "DDPMScheduler":
            ts = list(range(T - 1, -1, -1))[t_start:]
        else:
            ts = [i * (T // steps) for i in range(steps)][::-1][t_start:]
        if t_start:  # add_noise at the first timestep
            z = [mp.mpf(v) for v in _deter(flip=True).reshape(-1).tolist()]
            a = ab[ts[0]]
            x = [mp.sqrt(a) * xv + mp.sqrt(1 - a) * zv for xv, zv in zip(x, z)]
        k = 0
        for t in ts:
            a = ab[t]
            if kind == "DDPMScheduler":
                ap = ab[t - 1] if t > 0 else mp.mpf(1)
            else:
                tp = t - T // steps
                ap = ab[tp] if tp >= 0 else (mp.mpf(1) if config.get("set_alpha_to_one", True) else ab[0])
            out = []
            for xv in x:
                m = xv * t / (t + 1)
                if pred == "epsilon":
                    x0, e = (xv - mp.sqrt(1 - a) * m) / mp.sqrt(a), m
                else:
                    x0, e = mp.sqrt(a) * xv - mp.sqrt(1 - a) * m, mp.sqrt(a) * m + mp.sqrt(1 - a) * xv
                x0 = min(max(x0, mp.mpf(-1)), mp.mpf(1))  # clip_sample=True
                if kind == "DDPMScheduler":
                    beta = 1 - a / ap
                    out.append(mp.sqrt(ap) * beta / (1 - a) * x0 + mp.sqrt(1 - beta) * (1 - ap) / (1 - a) * xv)
                else:
                    out.append(mp.sqrt(ap) * x0 + mp.sqrt(1 - ap) * e)
            if kind == "DDPMScheduler" and t > 0:
                var = (1 - ap) / (1 - a) * (1 - a / ap)
                out = [o + mp.sqrt(var) * mp.mpf(zv) for o, zv in zip(out, noises[k])]
                k += 1
            x = out
        return float(mp.fsum(abs(v) for v in x))


def _torch_loop(sched, kind, steps, t_start):
    sample = _deter()
    if steps:
        sched.set_timesteps(steps)
    timesteps = sched.timesteps[t_start:]
    if t_start:
        sample = sched.add_noise(sample, _deter(flip=True), timesteps[:1])
    draws = []
    gen = torch.manual_seed(0)
    for t in timesteps:
        residual = sample * t / (t + 1)
        if kind == "DDPMScheduler":
            state = gen.get_state()
            if t > 0:
                draws.append(torch.randn(sample.shape, generator=gen).reshape(-1).tolist())
            gen.set_state(state)
            sample = sched.step(residual, t, sample, generator=gen).prev_sample
        else:
            sample = sched.step(residual, t, sample, 0.0).prev_sample
    return float(torch.sum(torch.abs(sample))), draws


LOOPS = [  # (test, kind, config, steps, t_start, diffusers' expected sum)
    ("test_full_loop_no_noise", "DDPMScheduler", {}, None, 0, 258.9606),
    ("test_full_loop_with_v_prediction", "DDPMScheduler", dict(prediction_type="v_prediction"), None, 0, 202.0296),
    ("test_full_loop_with_noise", "DDPMScheduler", {}, None, 998, 387.9466),
    ("test_full_loop_no_noise", "DDIMScheduler", {}, 10, 0, 172.0067),
    ("test_full_loop_with_v_prediction", "DDIMScheduler", dict(prediction_type="v_prediction"), 10, 0, 52.5302),
    (
        "test_full_loop_with_set_alpha_to_one",
        "DDIMScheduler",
        dict(set_alpha_to_one=True, beta_start=0.01),
        10,
        0,
        149.8295,
    ),
    (
        "test_full_loop_with_no_set_alpha_to_one",
        "DDIMScheduler",
        dict(set_alpha_to_one=False, beta_start=0.01),
        10,
        0,
        149.0784,
    ),
    ("test_full_loop_with_noise", "DDIMScheduler", {}, 10, 8, 354.5418),
]


def full_loops():
    print("| test | expected (diffusers' file) | diffusers 0.40.0 | adapter | mpmath (40 digits) |")
    print("|---|---|---|---|---|")
    for name, kind, config, steps, t_start, expected in LOOPS:
        cfg = dict(config, clip_sample=True)
        d, draws = _torch_loop(getattr(diffusers, kind)(**cfg), kind, steps, t_start)
        a, _ = _torch_loop(getattr(dm, kind)(**cfg), kind, steps, t_start)
        m = _mp_loop(kind, cfg, steps, t_start, draws)
        print(f"| {kind}.{name} | {expected} | {d:.6f} | {a:.6f} | {m:.6f} |")


# ----------------------------------------------------------------------------- the exact Gaussian oracle
def oracle_kl(sched, s, data, dtype, **step_kwargs):
    """KL(output || data) of the scheduler's full loop driven by the data's exact eps from
    x_T ~ N(0, I): the loop is affine in (x_T, z_1, ..., z_K) and is identified on the basis
    vectors in one batched run, the noise draws replaced by a stub of randn_tensor."""
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
    from diffusers.utils import torch_utils

    from diffmath.oracle import GaussianData

    D, K = data.dim, len(sched.timesteps)
    x = torch.zeros(1 + D + K * D, D, dtype=dtype)
    x[1 : 1 + D] = torch.eye(D, dtype=dtype)
    calls = []

    def stub(shape, generator=None, device=None, dtype=None, layout=None):
        k = len(calls)
        calls.append(k)
        z = torch.zeros(shape, dtype=dtype)
        if k < K:
            z[1 + D + k * D : 1 + D + (k + 1) * D] = torch.eye(D, dtype=dtype)
        return z

    mods = (torch_utils, scheduling_ddim, scheduling_ddpm)
    saved = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = stub
    try:
        for t in sched.timesteps:
            eps = torch.as_tensor(data.eps(x.double().numpy(), int(t), s)).to(dtype)
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
    finally:
        for m, f in zip(mods, saved):
            m.randn_tensor = f
    out = x.double().numpy()
    b = out[0]
    A = (out[1 : 1 + D] - b).T
    cov = A @ A.T
    for k in range(min(len(calls), K)):
        N = (out[1 + D + k * D : 1 + D + (k + 1) * D] - b).T
        cov += N @ N.T
    return GaussianData(b, 0.5 * (cov + cov.T)).kl(data)


ORACLE = [
    ("DDIMScheduler", "leading, 10 steps, eta 0", dict(), 10, dict(eta=0.0)),
    ("DDIMScheduler", "leading, 10 steps, eta 1", dict(), 10, dict(eta=1.0)),
    ("DDIMScheduler", "trailing, 10 steps, eta 0", dict(timestep_spacing="trailing"), 10, dict(eta=0.0)),
    ("DDIMScheduler", "trailing, 7 steps, eta 0", dict(timestep_spacing="trailing"), 7, dict(eta=0.0)),
    ("DDIMScheduler", "linspace, 10 steps, eta 0", dict(timestep_spacing="linspace"), 10, dict(eta=0.0)),
    ("DDIMScheduler", "linspace, 20 steps, eta 0", dict(timestep_spacing="linspace"), 20, dict(eta=0.0)),
    ("DDIMScheduler", "linspace, 50 steps, eta 0", dict(timestep_spacing="linspace"), 50, dict(eta=0.0)),
    ("DDPMScheduler", "leading, 10 steps, fixed_small", dict(), 10, {}),
    ("DDPMScheduler", "leading, 10 steps, fixed_large", dict(variance_type="fixed_large"), 10, {}),
    (
        "DDPMScheduler",
        "trailing, 7 steps, fixed_large",
        dict(variance_type="fixed_large", timestep_spacing="trailing"),
        7,
        {},
    ),
]


def oracle_table():
    from diffmath.oracle import GaussianData

    data = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.09]])
    print("| scheduler | grid | adapter | diffusers | adapter, diffusers_compat=True |")
    print("|---|---|---|---|---|")
    for kind, label, config, steps, kw in ORACLE:
        config = dict(config, clip_sample=False)
        scheds = [
            getattr(dm, kind)(**config),
            getattr(diffusers, kind)(**config),
            getattr(dm, kind)(**config, diffusers_compat=True),
        ]
        for sch in scheds:
            sch.set_timesteps(steps)
        s = scheds[0].schedule
        kls = [
            oracle_kl(sch, s, data, dt, **kw) for sch, dt in zip(scheds, (torch.float64, torch.float32, torch.float32))
        ]
        print(f"| {kind} | {label} | {kls[0]:.4e} | {kls[1]:.4e} | {kls[2]:.4e} |")


if __name__ == "__main__":
    main()
    print()
    oracle_table()
    print()
    full_loops()
