"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and
App. D.2; Chen et al. 2018 and Grathwohl et al. 2019 for the instantaneous change of
variables).

With dx/dt = F(x, t) = f(x, t) - g(t)^2 score(x, t) / 2, the density along a trajectory obeys
d log p_t(x(t)) / dt = -div F(x(t), t), so

    log p_eps(x) = log p_1(x(1)) + int_eps^1 div F(x(t), t) dt,   x(eps) = x,

integrated forward in time with ``scipy.integrate.solve_ivp``. The divergence is exact
(D backward passes, small D) or Hutchinson's estimate v^T (dF/dx) v with one probe v per
sample held fixed along the trajectory (Rademacher or Gaussian, E[v v^T] = I), which makes
the log-likelihood estimate unbiased: it is linear in the integrand.
"""

from __future__ import annotations

import numpy as np
import torch

from ._array import is_tensor
from .checks import check_float
from .losses import LN2
from .sde import SDE

__all__ = ["ode_likelihood"]


def ode_likelihood(
    sde: SDE,
    score_fn,
    x,
    divergence: str = "exact",
    *,
    eps=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    probe: str = "rademacher",
    generator=None,
    prior_logp=None,
):
    """(log_prob_nats, bits_per_dim) of x under the model defined by ``score_fn`` and its
    probability-flow ODE, per sample (Song et al. 2021, eq. 39-40).

    x: (B, ...) numpy or torch; the data at time ``eps`` (default ``sde.default_eps``; the
    density is that of p_eps, which tends to the data density as eps -> 0). ``score_fn(x, t)``
    is called with float64 torch tensors (x on x's device, t of shape (B,)) and must be
    differentiable by torch autograd: one call at the data before integrating checks that its
    output has x's shape and reaches x through autograd (ValueError for a score computed in
    numpy, under ``torch.no_grad`` or from ``x.detach()``, whose divergence autograd would
    miss, giving a confidently wrong log-likelihood). ``divergence``: "exact" or "hutchinson" (``probe``
    "rademacher" or "gaussian", drawn from ``generator``: a torch.Generator, or a numpy
    Generator whose draws are converted). ``prior_logp(z) -> (B,)`` defaults to the SDE's
    exact prior (N(0, I) for VP/sub-VP, N(0, sigma_max^2 I) for VE); pass the exact marginal
    p_1 to remove the prior mismatch. bits/dim = -log_prob / (D ln 2), D = prod(x.shape[1:]),
    with no dequantization offset. Returns arrays of shape (B,) in x's kind.
    """
    from scipy.integrate import solve_ivp

    from .checks import check_eps, check_tol

    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffmath SDE; got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t); got {type(score_fn).__name__}")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson'; got {divergence!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian'; got {probe!r}")
    eps = check_eps(sde, eps)
    rtol, atol = check_tol(rtol, "rtol"), check_tol(atol, "atol")
    x = check_float(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, ...) with at least one data dimension; got {tuple(x.shape)}")
    dev = x.device if is_tensor(x) else torch.device("cpu")
    shp = tuple(x.shape)
    B = shp[0]
    D = int(np.prod(shp[1:]))
    x64 = x.detach().to(torch.float64).cpu().numpy() if is_tensor(x) else np.asarray(x, dtype=np.float64)
    _check_score_depends_on_x(score_fn, x64, eps, dev)
    rsde = sde.reverse(_checked(score_fn), probability_flow=True)

    v: torch.Tensor | None = None
    if divergence == "hutchinson":
        if isinstance(generator, torch.Generator):
            if probe == "gaussian":
                v = torch.randn(shp, generator=generator, device=generator.device, dtype=torch.float64).to(dev)
            else:
                v = (torch.randint(0, 2, shp, generator=generator, device=generator.device) * 2 - 1).to(
                    dev, torch.float64
                )
        else:
            g = generator if generator is not None else np.random.default_rng()
            if not isinstance(g, np.random.Generator):
                raise TypeError(
                    f"generator must be a numpy.random.Generator or torch.Generator; got {type(g).__name__}"
                )
            vv = g.standard_normal(shp) if probe == "gaussian" else g.integers(0, 2, shp) * 2.0 - 1.0
            v = torch.as_tensor(vv, dtype=torch.float64, device=dev)

    def drift_and_div(y, t):
        xt = torch.as_tensor(y[: B * D].reshape(shp), dtype=torch.float64, device=dev).requires_grad_(True)
        tt = torch.full((B,), float(t), dtype=torch.float64, device=dev)
        with torch.enable_grad():
            F = rsde.sde(xt, tt)[0]
            if divergence == "exact":
                Ff = F.reshape(B, D)
                div = torch.zeros(B, dtype=torch.float64, device=dev)
                for i in range(D):
                    (gi,) = torch.autograd.grad(Ff[:, i].sum(), xt, retain_graph=i < D - 1)
                    div = div + gi.reshape(B, D)[:, i]
            else:
                assert v is not None  # the Hutchinson probe drawn above
                (gv,) = torch.autograd.grad((F * v).sum(), xt)
                div = (gv * v).reshape(B, D).sum(1)
        return F.detach().reshape(-1).cpu().numpy(), div.detach().cpu().numpy()

    def rhs(t, y):
        tc = min(max(t, eps), sde.T)
        f, div = drift_and_div(y, tc)
        if not (np.all(np.isfinite(f)) and np.all(np.isfinite(div))):
            raise ValueError(
                f"score_fn returned non-finite values (NaN or inf) at t = {float(tc)}; "
                "the probability-flow ODE's drift and its divergence must be finite"
            )
        return np.concatenate([f, div])

    y0 = np.concatenate([x64.reshape(-1), np.zeros(B)])
    sol = solve_ivp(rhs, (eps, sde.T), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    z = sol.y[: B * D, -1].reshape(shp)
    delta = sol.y[B * D :, -1]
    if prior_logp is None:
        lp_prior = np.asarray(sde.prior_logp(z), dtype=np.float64)
    else:
        lp_prior = prior_logp(z)
        lp_prior = np.asarray(lp_prior.detach().cpu().numpy() if is_tensor(lp_prior) else lp_prior, dtype=np.float64)
        if lp_prior.shape != (B,):
            raise ValueError(f"prior_logp must return shape ({B},); got {lp_prior.shape}")
    logp = lp_prior + delta
    bpd = -logp / (D * LN2)
    if is_tensor(x):
        return torch.as_tensor(logp, device=x.device), torch.as_tensor(bpd, device=x.device)
    return logp, bpd


def _check_score_depends_on_x(score_fn, x64: np.ndarray, t: float, dev):
    """Refuse, before integrating, a score whose output is not connected to x's autograd graph.

    The divergence of the drift f - g^2 score / 2 is taken by autograd: a score computed in
    numpy and wrapped with torch.tensor / from_numpy, detached, or computed under torch.no_grad
    looks constant in x, so the divergence sees only the linear drift and the log-likelihood is
    confidently wrong (-12.06 nats for a Gaussian whose exact value is -0.91). One call at the
    data (t = eps) finds that: its output must require grad and reach x by autograd."""
    xt = torch.as_tensor(x64, dtype=torch.float64, device=dev).requires_grad_(True)
    tt = torch.full((x64.shape[0],), float(t), dtype=torch.float64, device=dev)
    with torch.enable_grad():
        out = _checked(score_fn)(xt, tt)
        if tuple(out.shape) != tuple(xt.shape):
            raise ValueError(f"score_fn must return the shape of x {tuple(xt.shape)}; got {tuple(out.shape)}")
        hint = (
            "ode_likelihood takes the divergence of the probability-flow drift by torch autograd, so the score "
            "must be computed from x with torch operations: not in numpy (wrapped by torch.tensor / "
            "torch.from_numpy), not on x.detach(), not under torch.no_grad()"
        )
        if not out.requires_grad:
            raise ValueError(
                f"score_fn's output does not depend on x through autograd (it does not require grad); {hint}"
            )
        (g,) = torch.autograd.grad(out.sum(), xt, allow_unused=True)
    if g is None:
        raise ValueError(
            f"score_fn's output is not connected to x's autograd graph (it requires grad only through "
            f"other tensors, e.g. the model's parameters); {hint}"
        )


def _checked(score_fn):
    def f(x, t):
        out = score_fn(x, t)
        if not is_tensor(out):
            raise TypeError(
                "score_fn must return a torch tensor (differentiable by autograd) for ode_likelihood; "
                f"got {type(out).__name__}"
            )
        return out

    return f
