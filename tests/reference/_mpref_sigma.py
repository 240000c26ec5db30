"""50-digit mpmath references for the sigma-space diffusers schedulers (Euler, Euler ancestral,
Heun, DPM-Solver++ 2M, LMS, UniPC): a whole loop of steps on given inputs.

Written from the papers' definitions, element by element: betas from the config as exact
decimals (linear: beta_start + (beta_end - beta_start) i/(T - 1)), abar_t = prod_{j <= t}
(1 - beta_j), sigma_t = sqrt((1 - abar_t)/abar_t), the inference ladder at the timesteps the
config's ``timestep_spacing`` names (sigma linear in t between table entries), then 0.
Every call k of a loop gets its own (sample, model output) pair, the same float values for
every implementation, and the reference carries the multistep history from those inputs the
way each method defines it. Shared with benchmarks/diffusers_accuracy.py.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np

DPS = 50


def sigma_table(config, dps=DPS):
    """sigma_t, t = 0 .. T-1, from the config's linear / scaled_linear betas (DDPM eq. 4; the
    LDM schedule is linear in sqrt(beta))."""
    with mp.workdps(dps):
        T = int(config.get("num_train_timesteps", 1000))
        bs, be = mp.mpf(repr(config["beta_start"])), mp.mpf(repr(config["beta_end"]))
        sched = config.get("beta_schedule", "linear")
        if sched == "linear":
            betas = [bs + (be - bs) * i / (T - 1) for i in range(T)]
        elif sched == "scaled_linear":
            betas = [(mp.sqrt(bs) + (mp.sqrt(be) - mp.sqrt(bs)) * i / (T - 1)) ** 2 for i in range(T)]
        else:
            raise ValueError(f"beta_schedule={sched!r} has no reference here")
        out, p = [], mp.mpf(1)
        for b in betas:
            p *= 1 - b
            out.append(mp.sqrt((1 - p) / p))
        return out


def ladder(config, steps, kind, dps=DPS):
    """(timesteps, sigmas) of the inference ladder: 'linspace' spacing, sigma interpolated
    linearly in t, a final 0. Euler / Heun / LMS space S points over [0, T-1]; DPM-Solver and
    UniPC space S + 1 points and round them (both as diffusers' configs define 'linspace')."""
    with mp.workdps(dps):
        table = sigma_table(config, dps)
        T = len(table)
        if config.get("timestep_spacing", "linspace") != "linspace":
            raise ValueError("only timestep_spacing='linspace' has a reference here")
        if kind in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            ts = [mp.mpf(int(np.round(k * (T - 1) / steps))) for k in range(steps + 1)][::-1][:-1]
        else:
            # diffusers' linspace timesteps are float32 and the model is called at them: the
            # levels are sigma at those t (k (T - 1)/(S - 1) rounded to float32)
            ts = [mp.mpf(float(np.float32(mp.mpf(k * (T - 1)) / (steps - 1)))) for k in range(steps)][::-1]
        sig = []
        for t in ts:
            lo = int(mp.floor(t))
            hi = min(lo + 1, T - 1)
            w = t - lo
            sig.append(table[lo] * (1 - w) + table[hi] * w)
        return [float(t) for t in ts], sig + [mp.mpf(0)]


def _vec(a):
    return [mp.mpf(v) for v in np.asarray(a, dtype=np.float64).reshape(-1).tolist()]


def _out(v, shape):
    return np.array([float(x) for x in v]).reshape(shape)


def euler_loop(sig, xs, ms, noises=None, dps=DPS):
    """Euler (Karras et al. 2022, Alg. 1 with s_churn = 0): D = x - sigma eps,
    x' = x + (sigma' - sigma)(x - D)/sigma. With ``noises``, Euler ancestral (k-diffusion's
    split of the DDPM posterior): sigma_up = sigma' sqrt(sigma^2 - sigma'^2)/sigma,
    sigma_down = sqrt(sigma'^2 - sigma_up^2), x' = x + (sigma_down - sigma)(x - D)/sigma + sigma_up z."""
    with mp.workdps(dps):
        outs = []
        for k, (x, m) in enumerate(zip(xs, ms)):
            s, sn = sig[k], sig[k + 1]
            X, M = _vec(x), _vec(m)
            D = [xv - s * mv for xv, mv in zip(X, M)]
            if noises is None:
                o = [xv + (sn - s) * (xv - dv) / s for xv, dv in zip(X, D)]
            else:
                up = sn * mp.sqrt(s**2 - sn**2) / s
                down = mp.sqrt(sn**2 - up**2)
                o = [xv + (down - s) * (xv - dv) / s + up * zv for xv, dv, zv in zip(X, D, _vec(noises[k]))]
            outs.append(_out(o, np.shape(x)))
        return outs


def heun_loop(sig, xs, ms, dps=DPS):
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1), one call per
    model evaluation on the N-level ladder sig (last 0): call 2i at sigma_i takes the Euler
    point, call 2i + 1 at sigma_{i+1} averages the slopes, x_{i+1} = x_i + dt (d_i + d~)/2,
    where x_i, d_i come from call 2i's inputs; the last level's single call steps to sigma = 0,
    which returns D."""
    with mp.workdps(dps):
        outs, state = [], None
        for k, (x, m) in enumerate(zip(xs, ms)):
            X, M = _vec(x), _vec(m)
            i = (k + 1) // 2
            s = sig[i]
            D = [xv - s * mv for xv, mv in zip(X, M)]
            d = [(xv - dv) / s for xv, dv in zip(X, D)]
            if state is None:
                dt = sig[i + 1] - s
                o = [xv + dt * dv for xv, dv in zip(X, d)]
                state = (X, d, dt) if sig[i + 1] > 0 else None
            else:
                X0, d0, dt = state
                o = [x0 + dt * (a + b) / 2 for x0, a, b in zip(X0, d0, d)]
                state = None
            outs.append(_out(o, np.shape(x)))
        return outs


def lms_loop(sig, xs, ms, order=4, dps=DPS):
    """Linear multistep in sigma (Karras et al. 2022; k-diffusion's LMS): d_i = (x_i - D_i)/sigma_i,
    x_{i+1} = x_i + sum_j c_j d_{i-j}, c_j = int_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau with l_j the
    Lagrange basis on sigma_i, ..., sigma_{i-q+1}, q = min(order, i + 1) (Gauss-Legendre in
    mpmath, exact for these polynomials)."""
    with mp.workdps(dps):
        outs, ds = [], []
        for i, (x, m) in enumerate(zip(xs, ms)):
            X, M = _vec(x), _vec(m)
            s = sig[i]
            ds.append([mv for mv in M])  # (x - D)/sigma = eps for epsilon prediction
            q = min(order, i + 1)
            nodes = [sig[i - j] for j in range(q)]

            def basis(j):
                return lambda tau: mp.fprod((tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(q) if k != j)

            c = [mp.quad(basis(j), [s, sig[i + 1]]) for j in range(q)]
            o = [xv + mp.fsum(c[j] * ds[i - j][e] for j in range(q)) for e, xv in enumerate(X)]
            outs.append(_out(o, np.shape(x)))
        return outs


def _vp(s):
    """(alpha_t, sigma_t, lambda_t) of the VP process at sigma = s (the DDPM x_t scale)."""
    a = 1 / mp.sqrt(1 + s**2)
    return a, s * a, -mp.log(s)


def dpm2m_loop(sig, xs, ms, lower_order_final=True, dps=DPS):
    """DPM-Solver++(2M) in data prediction (Lu et al. 2022b, Alg. 2), midpoint form:
    D_i = (x_i - sigma_i eps)/alpha_i, h = lambda_{i+1} - lambda_i,
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D_i + (D_i - D_{i-1})/(2 r)),
    r = (lambda_i - lambda_{i-1})/h; first order at i = 0 and (lower_order_final, < 15 steps) at
    the last step; the step to sigma = 0 (lambda = inf) returns D_i."""
    with mp.workdps(dps):
        outs, Ds, n = [], [], len(xs)
        for i, (x, m) in enumerate(zip(xs, ms)):
            X, M = _vec(x), _vec(m)
            a, sv, lam = _vp(sig[i])
            D = [(xv - sv * mv) / a for xv, mv in zip(X, M)]
            Ds.append(D)
            if sig[i + 1] == 0:
                o = D
            else:
                an, svn, lamn = _vp(sig[i + 1])
                h = lamn - lam
                first = i == 0 or (lower_order_final and n < 15 and i == n - 1)
                if first:
                    o = [svn / sv * xv - an * mp.expm1(-h) * dv for xv, dv in zip(X, D)]
                else:
                    r = (lam - _vp(sig[i - 1])[2]) / h
                    o = [
                        svn / sv * xv - an * mp.expm1(-h) * (dv + (dv - dp) / (2 * r))
                        for xv, dv, dp in zip(X, D, Ds[i - 1])
                    ]
            outs.append(_out(o, np.shape(x)))
        return outs


def _unipc_rhos(rks, h, bh2=True):
    """The coefficients of UniPC with B(h) (Zhao et al. 2023, Alg. 2 / eq. 8, data prediction,
    hh = -h): sum_k rho_k r_k^{i-1} = i! phi_{i+1}(hh) hh / B(hh), i = 1 .. p, with
    hh phi_1 = e^{hh} - 1 and phi_{k+1} = (phi_k - 1/k!)/hh."""
    hh = -h
    B = mp.expm1(hh) if bh2 else hh
    phi = mp.expm1(hh) / hh  # phi_1
    R, b = [], []
    for i in range(1, len(rks) + 1):
        phi = (phi - 1 / mp.factorial(i)) / hh  # phi_{i+1}
        R.append([rk ** (i - 1) for rk in rks])
        b.append(phi * hh * mp.factorial(i) / B)
    return list(mp.lu_solve(mp.matrix(R), mp.matrix(b))), B


def unipc_loop(sig, xs, ms, order=2, lower_order_final=True, dps=DPS):
    """UniPC-p with B(h) = e^h - 1 (bh2), data prediction (Zhao et al. 2023, Alg. 2-3): at
    call i the corrector UniC re-solves the previous step from its start xc_{i-1} with the new
    D_i (order = the previous predictor's + 1 through D_i), then the predictor UniP of order
    min(order, i + 1, and with lower_order_final the steps left) starts from the corrected
    point; UniP-2 uses rho = 1/2 (the paper's choice); the step to sigma = 0 returns D_i."""
    with mp.workdps(dps):
        outs, Ds, n = [], [], len(xs)
        lam = [(_vp(s)[2] if s > 0 else mp.inf) for s in sig]
        prev = None  # (start point, step index, predictor order)
        for i, (x, m) in enumerate(zip(xs, ms)):
            X, M = _vec(x), _vec(m)
            a, sv, _ = _vp(sig[i])
            D = [(xv - sv * mv) / a for xv, mv in zip(X, M)]
            Ds.append(D)
            if prev is not None:  # corrector of step j -> i
                Xs, j, p = prev
                X = _unipc_update(sig, lam, Ds, Xs, j, i, p, corrector=True)
            if sig[i + 1] == 0:
                o = D
                prev = None
            else:
                p = min(order, i + 1)
                if lower_order_final:
                    p = min(p, n - i)
                o = _unipc_update(sig, lam, Ds, X, i, i + 1, p, corrector=False)
                prev = (X, i, p)
            outs.append(_out(o, np.shape(x)))
        return outs


def _unipc_update(sig, lam, Ds, Xs, j, t, p, corrector):
    """x_t from x_j = Xs with D_j, ..., D_{j-p+1} (and D_t for the corrector)."""
    a_t, s_t, _ = _vp(sig[t])
    s_j = _vp(sig[j])[1]
    h = lam[t] - lam[j]
    m0 = Ds[j]
    rks = [(lam[j - k] - lam[j]) / h for k in range(1, p)]
    D1s = [[(mv - m0v) / rk for mv, m0v in zip(Ds[j - k], m0)] for k, rk in zip(range(1, p), rks)]
    base = [s_t / s_j * xv - a_t * mp.expm1(-h) * m0v for xv, m0v in zip(Xs, m0)]
    if corrector:  # UniC-p through D_t (r = 1); UniC-1 takes rho = 1/2
        rhos = _unipc_rhos(rks + [mp.mpf(1)], h)[0] if p > 1 else [mp.mpf(1) / 2]
        D1s = D1s + [[dt - m0v for dt, m0v in zip(Ds[t], m0)]]
    elif p == 1:
        return base
    else:
        rhos = _unipc_rhos(rks, h)[0] if p > 2 else [mp.mpf(1) / 2]
    B = mp.expm1(-h)
    return [bv - a_t * B * mp.fsum(r * d[e] for r, d in zip(rhos, D1s)) for e, bv in enumerate(base)]


def rel_error(ours, ref) -> float:
    """Norm-wise relative error ||ours - ref|| / ||ref|| in float64."""
    o = ours.detach().cpu().double().numpy() if hasattr(ours, "detach") else np.asarray(ours, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(o - r) / np.linalg.norm(r))


__all__ = ["sigma_table", "ladder", "euler_loop", "heun_loop", "lms_loop", "dpm2m_loop", "unipc_loop", "rel_error"]


# ----------------------------------------------------------------------------- driving a scheduler
LOOPS = {
    "EulerDiscreteScheduler": euler_loop,
    "EulerAncestralDiscreteScheduler": euler_loop,
    "HeunDiscreteScheduler": heun_loop,
    "LMSDiscreteScheduler": lms_loop,
    "DPMSolverMultistepScheduler": dpm2m_loop,
    "UniPCMultistepScheduler": unipc_loop,
}


def calls_inputs(kind, sig, shape, seed=0):
    """One float32-representable (sample, eps) pair per model call, as float64 arrays: the
    sample a perfect model meets at that call's level (x0 + sigma eps for the sigma-space
    classes, alpha x0 + sigma_vp eps for DPM-Solver / UniPC), the eps as the model output."""
    rng = np.random.default_rng(seed)
    if kind == "HeunDiscreteScheduler":
        levels = [0] + [i for i in range(1, len(sig) - 1) for _ in (0, 1)][:-1]
    else:
        levels = list(range(len(sig) - 1))
    xs, ms = [], []
    for i in levels:
        s = float(sig[i])
        x0, eps = rng.standard_normal(shape), rng.standard_normal(shape)
        x = x0 + s * eps
        if kind in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            x = x / math.sqrt(1 + s * s)
        xs.append(x.astype(np.float32).astype(np.float64))
        ms.append(eps.astype(np.float32).astype(np.float64))
    return xs, ms


def drive(sched, xs, ms, dtype, seed=0):
    """The scheduler's outputs for the calls (xs, ms) fed as ``dtype`` tensors, one fresh call of
    ``step`` per pair at sched.timesteps[k] (each call sees the given sample, so the outputs
    measure the step arithmetic, not accumulated error); the ancestral class gets a generator
    seeded seed + k, and the noise it draws (randn of the sample's shape and dtype) is returned."""
    import torch

    outs, noises = [], []
    for k, (x, m) in enumerate(zip(xs, ms)):
        t = sched.timesteps[k]
        xt, mt = torch.tensor(x, dtype=dtype), torch.tensor(m, dtype=dtype)
        sched.scale_model_input(xt, t)  # the pipelines' call; marks the input as scaled
        kw = {}
        if "Ancestral" in type(sched).__name__:
            kw["generator"] = torch.Generator().manual_seed(seed + k)
            noises.append(
                torch.randn(xt.shape, generator=torch.Generator().manual_seed(seed + k), dtype=dtype).double().numpy()
            )
        outs.append(sched.step(mt, t, xt, **kw).prev_sample)
    return outs, noises


def reference(kind, config, sig, xs, ms, noises=None):
    """The mpmath outputs of the calls (xs, ms) for the scheduler ``kind`` under its full
    (resolved) ``config``; ``noises`` are the ancestral draws."""
    if kind == "EulerAncestralDiscreteScheduler":
        return euler_loop(sig, xs, ms, noises=noises)
    if kind == "DPMSolverMultistepScheduler":
        if (config["algorithm_type"], config["solver_type"], config["solver_order"]) != ("dpmsolver++", "midpoint", 2):
            raise ValueError("only DPM-Solver++(2M), midpoint, has a reference here")
        return dpm2m_loop(sig, xs, ms, lower_order_final=config["lower_order_final"])
    if kind == "UniPCMultistepScheduler":
        if (config["solver_type"], config["predict_x0"], config["disable_corrector"]) != ("bh2", True, []):
            raise ValueError("only UniPC bh2 in data prediction with every corrector has a reference here")
        return unipc_loop(sig, xs, ms, order=config["solver_order"], lower_order_final=config["lower_order_final"])
    return LOOPS[kind](sig, xs, ms)


def step_errors(kind, config, steps, shape=(2, 3, 4, 4), seed=0, classes=()):
    """Worst relative error of a call over the loop, for each (scheduler class, dtype) in
    ``classes``, against the mpmath reference on the config's exact ladder; every call of a
    ``steps``-level loop. Also checks the classes step on the ladder's timesteps."""

    resolved = dict(classes[0][0](**config).config)
    if resolved.get("prediction_type", "epsilon") != "epsilon" or resolved.get("use_karras_sigmas"):
        raise ValueError("only epsilon prediction on the interpolated ladder has a reference here")
    ts, sig = ladder(resolved, steps, kind)
    xs, ms = calls_inputs(kind, sig, shape, seed)
    worst = []
    for cls, dtype in classes:
        sched = cls(**config)
        sched.set_timesteps(steps)
        got = [float(t) for t in sched.timesteps]
        if kind == "HeunDiscreteScheduler":
            got = got[:1] + got[1::2]
        if got != ts:
            raise AssertionError(f"{cls.__module__}.{kind} steps on {got}, the reference on {ts}")
        outs, noises = drive(sched, xs, ms, dtype, seed)
        if not all(o.dtype == dtype for o in outs):
            raise AssertionError(f"{cls.__module__}.{kind} returned another dtype than {dtype}")
        ref = reference(kind, resolved, sig, xs, ms, noises or None)
        worst.append(max(rel_error(o, r) for o, r in zip(outs, ref)))
    return worst
