"""diffusers' DDPM/DDIM schedulers and diffmath's adapter against 50-digit mpmath.

    .venv/bin/python benchmarks/diffusers_accuracy.py            (about a minute on 2 cores)

Prints the tables of docs/diffusers.md: for each configuration, the worst norm-wise relative
error ||out - ref|| / ||ref|| of one step over every timestep of the grid, for diffusers'
class (float32, its native precision), the adapter fed float32 tensors (result rounded to
float32) and the adapter fed float64 tensors; then the error of the alphas_cumprod tables.
The inputs are x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with x0, eps ~ N(0, 1) (seeded) and the
true eps (or v, or x0) as the model output, so every step is the one a perfect model meets.
"""

from __future__ import annotations

import os
import sys

import mpmath as mp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import diffusers  # noqa: E402
from _mpref_diffusers import abar, ddim_step, ddpm_step, rel_error  # noqa: E402

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
                z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i), dtype=mi.dtype) if t > 0 else None
                ref, _ = ddpm_step(betas, xi, mi, t, t_prev, noise=z, variance=config.get("variance_type", "fixed_small"),
                                   prediction=pred)
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
    ("DDPMScheduler", "scaled_linear, 50 leading, v", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012, clip_sample=False,
                                                             prediction_type="v_prediction"), 50, 0.0),
    ("DDPMScheduler", "cosine, 50 leading, fixed_large", dict(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                                              variance_type="fixed_large"), 50, 0.0),
    ("DDIMScheduler", "linear, 50 leading, eta 0", dict(clip_sample=False), 50, 0.0),
    ("DDIMScheduler", "linear, 50 leading, eta 1", dict(clip_sample=False), 50, 1.0),
    ("DDIMScheduler", "scaled_linear, 50 leading, eta 0", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                beta_end=0.012, clip_sample=False), 50, 0.0),
    ("DDIMScheduler", "cosine, 50 leading, v, eta 0", dict(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                                           prediction_type="v_prediction"), 50, 0.0),
]


def main():
    print("| scheduler | configuration | diffusers (fp32) | adapter, fp32 in/out | adapter, fp64 |")
    print("|---|---|---|---|---|")
    for kind, label, config, steps, eta in CASES:
        d, a32, a64 = step_errors(kind, config, steps, eta)
        print(f"| {kind} | {label} | {d:.1e} | {a32:.1e} | {a64:.1e} |")
    print()
    print("| alphas_cumprod (T = 1000) | diffusers (fp32 cumprod) | adapter (float64) |")
    print("|---|---|---|")
    for label, config in (("linear", {}), ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                    beta_end=0.012)),
                          ("squaredcos_cap_v2", dict(beta_schedule="squaredcos_cap_v2"))):
        d, a = table_errors(config)
        print(f"| {label} | {d:.1e} | {a:.1e} |")


if __name__ == "__main__":
    main()
