"""Probability-flow ODE samplers (Song et al. 2021, Sec. 4.3, eq. 13):

dx/dt = f(x, t) - g(t)^2 score(x, t) / 2,

integrated from t = 1 (prior) to t = eps, adaptively with ``scipy.integrate.solve_ivp``
(RK45 by default, as score_sde) or with a fixed-step Heun scheme (Karras et al. 2022, Alg. 1)
that runs on torch (CPU or CUDA) as well as numpy.
"""

from __future__ import annotations

import numpy as np
import torch

from .._array import is_tensor, restore, upcast
from ..checks import check_dt, check_eps, check_float, check_tol
from ..sde import SDE, ReverseSDE
from ._common import LoopModel, check_out_dtype, check_score_args, finish, model_t, progress_bar, start
from .sde_solvers import time_grid

__all__ = ["heun_step", "sample_ode", "sample_ode_heun"]


def heun_step(rsde, x, t, dt):
    """One Heun (explicit trapezoid) step of the probability-flow ODE dx/dt = F(x, t)
    (Karras et al. 2022, Alg. 1 without churn):

    d1 = F(x, t);  x~ = x + dt d1;  d2 = F(x~, t + dt);  x' = x + dt (d1 + d2) / 2.

    ``rsde`` = ``sde.reverse(score_fn, probability_flow=True)``; dt < 0 in reverse time and
    t, t + dt in (0, 1]. x: (B, ...); t: float or (B,). Returns x' (x's shape and dtype).
    """
    if not isinstance(rsde, ReverseSDE) or not rsde.probability_flow:
        raise TypeError("rsde must be sde.reverse(score_fn, probability_flow=True)")
    x = check_float(x, "x")
    dt = check_dt(dt)
    t_next = t + dt
    xc = upcast(x)
    d1 = upcast(rsde.sde(x, t)[0])
    x_e = xc + dt * d1
    d2 = upcast(rsde.sde(restore(x_e, x), t_next)[0])
    return restore(xc + 0.5 * dt * (d1 + d2), x)


def sample_ode_heun(
    score_fn,
    sde: SDE,
    shape=None,
    *,
    steps: int = 100,
    eps=None,
    generator=None,
    progress: bool = False,
    callback=None,
    x_T=None,
    out_dtype=None,
):
    """Fixed-step Heun integration of the probability-flow ODE from x_1 ~ prior to t = eps on
    ``time_grid(sde, steps, eps)`` (2 score evaluations per step; second order).
    Works on numpy and torch (CPU/CUDA); ``callback(t=, x=)`` after each step.

    Precision: the state is float32 (float64 for a float64 x_T or a numpy loop without x_T)
    whatever the dtype of x_T or of the model's output; the model gets x in the state's dtype
    and a float16/bfloat16 output is upcast before the update. The result is in the state's
    dtype, or rounded once to ``out_dtype`` when given. A non-finite model output stops the
    loop with a ValueError naming the step and t (docs/samplers.md).
    """
    check_score_args(sde, score_fn)
    ts = time_grid(sde, steps, eps)
    x, _ = start(shape, generator, x_T, scale=sde.prior_std)
    out_dtype = check_out_dtype(out_dtype, x)
    n = len(ts) - 1
    model = LoopModel(score_fn, "score_fn", "sample_ode_heun", n)
    rsde = sde.reverse(model, probability_flow=True)
    for k in progress_bar(range(n), n, progress, "Heun (probability flow)"):
        model.step = k
        x = heun_step(rsde, x, model_t(ts[k], x, integer=False), ts[k + 1] - ts[k])
        if callback is not None:
            callback(t=float(ts[k + 1]), x=x)
    return finish(x, out_dtype)


def sample_ode(
    score_fn,
    sde: SDE,
    shape=None,
    *,
    eps=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    generator=None,
    progress: bool = False,
    x_T=None,
    return_nfev: bool = False,
    out_dtype=None,
):
    """Probability-flow ODE sampling (Song et al. 2021, eq. 13) with ``scipy.integrate.solve_ivp``
    (score_sde ``get_ode_sampler``): x_1 ~ prior, integrate dx/dt = f - g^2 score / 2 from t = 1 to
    eps (default 1e-3 VP/sub-VP, 1e-5 VE) with ``method`` at tolerances ``rtol``, ``atol``.

    The solver state is float64 numpy; ``score_fn(x, t)`` is called with x of the sample's
    kind (numpy, or a tensor on x_T's / the generator's device) in the loop state's dtype
    (float32, or float64 for a float64 x_T or a numpy loop without x_T; a float16/bfloat16
    x_T is upcast) and t a float array (B,); its output is read in float64. A non-finite
    output stops the integration with a ValueError naming t. Returns the sample in the state's
    dtype, or rounded once to ``out_dtype`` when given (and the number of score evaluations
    with ``return_nfev``).
    """
    from scipy.integrate import solve_ivp

    check_score_args(sde, score_fn)
    eps = check_eps(sde, eps)
    rtol, atol = check_tol(rtol, "rtol"), check_tol(atol, "atol")
    x, _ = start(shape, generator, x_T, scale=sde.prior_std)
    out_dtype = check_out_dtype(out_dtype, x)
    rsde = sde.reverse(score_fn, probability_flow=True)
    shp = tuple(x.shape)
    if is_tensor(x):
        y0 = x.detach().to(torch.float64).cpu().numpy().reshape(-1)

        def to_kind(y):
            return torch.as_tensor(y.reshape(shp), device=x.device).to(x.dtype)

        def to_np(v):
            return v.detach().to(torch.float64).cpu().numpy().reshape(-1)
    else:
        y0 = np.asarray(x, dtype=np.float64).reshape(-1)

        def to_kind(y):
            return y.reshape(shp).astype(x.dtype, copy=False)

        def to_np(v):
            return np.asarray(v, dtype=np.float64).reshape(-1)

    bar = progress_bar(None, 1000, progress, "probability-flow ODE")
    done = [0]

    def rhs(t, y):
        xt = to_kind(y)
        drift = to_np(rsde.sde(xt, model_t(min(max(t, eps), sde.T), xt, integer=False))[0])
        if not np.all(np.isfinite(drift)):
            raise ValueError(
                f"score_fn returned non-finite values (NaN or inf) at t = {float(t)}; "
                "the probability-flow ODE's drift must be finite"
            )
        pos = int(round(1000 * (sde.T - t) / (sde.T - eps)))
        if pos > done[0]:
            bar.update(pos - done[0])
            done[0] = pos
        return drift

    try:
        sol = solve_ivp(rhs, (sde.T, eps), y0, method=method, rtol=rtol, atol=atol)
    finally:
        bar.close()
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    out = finish(restore(to_kind(sol.y[:, -1]), x), out_dtype)
    return (out, int(sol.nfev)) if return_nfev else out
