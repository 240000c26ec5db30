"""Score-based SDEs (Song et al. 2021, "Score-based generative modeling through stochastic
differential equations", score_sde): VP, sub-VP and VE.

Each SDE is dx = f(x, t) dt + g(t) dw on t in [0, T], T = 1, with a linear drift
f(x, t) = a(t) x, and Gaussian perturbation kernels p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I):

    VP      a(t) = -beta(t)/2,  g(t)^2 = beta(t),  beta(t) = beta_min + t (beta_max - beta_min)
            m(t) = exp(lmc(t)),  lmc(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2
            s(t)^2 = 1 - exp(2 lmc(t))                                        (eq. 11, 29)
    sub-VP  a(t) = -beta(t)/2,  g(t)^2 = beta(t) (1 - exp(4 lmc(t)))
            m(t) = exp(lmc(t)),  s(t) = 1 - exp(2 lmc(t))                     (eq. 12, 29)
    VE      a(t) = 0,  sigma(t) = sigma_min (sigma_max/sigma_min)^t,
            g(t) = sigma(t) sqrt(2 log(sigma_max/sigma_min))
            m(t) = 1,  s(t)^2 = sigma(t)^2 - sigma_min^2                      (eq. 9, 30)

These solve the moment ODEs dm/dt = a m, dv/dt = 2 a v + g^2 with m(0) = 1, v(0) = 0
(Saerkkae & Solin 2019, eq. 5.50-5.51; asserted against ``scipy.integrate.solve_ivp`` in
tests/core/test_sde.py). Every coefficient is computed in float64 without cancellation
(``expm1`` for 1 - exp(.)) and cast to the input's compute dtype at the end.

**VE marginal std.** score_sde uses s(t) = sigma(t), the std of the perturbation kernel
when x_0 is already perturbed by sigma_min; the SDE started at t = 0 from x_0 has the exact
s(t) = sqrt(sigma(t)^2 - sigma_min^2) = sigma_min sqrt(expm1(2 t log(sigma_max/sigma_min))),
which is what ``VESDE.marginal_prob`` returns (the two differ by sigma_min^2 in variance,
negligible for t >> 0 and relevant only near t = 0). The prior stays score_sde's
N(0, sigma_max^2 I).

Time ``t`` is a python float, a float array of shape (B,) or a tensor; ``sde`` and
``marginal_prob`` accept t in [0, 1], anything that divides by the marginal std (scores,
samplers) needs t in (0, 1]. Per-sample coefficients of shape (B,) broadcast over the
trailing dimensions of x.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._array import ArrayT, TimeLike, backend, broadcast_coef, compute_dtype, is_tensor, randn, restore, upcast
from .checks import check_float, check_like, check_time

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "score_from_eps", "eps_from_score"]

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- time helpers
def _prior_draw(shape, generator, dtype):
    """Standard normal draws of ``shape`` from a numpy or torch generator (a fresh numpy one
    for None; never global state)."""
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, (np.random.Generator, torch.Generator)):
        raise TypeError(
            f"generator must be a numpy.random.Generator or torch.Generator; got {type(generator).__name__}"
        )
    return randn(shape, generator, dtype=dtype)


# ----------------------------------------------------------------------------- base class
class SDE:
    """A linear-drift SDE dx = a(t) x dt + g(t) dw on [0, 1] (score_sde's ``SDE`` interface).

    Subclasses define, on float64 time arrays/tensors: ``_a(t)`` (drift coefficient),
    ``_g(t)`` (diffusion), ``_marg(t) -> (m, s)`` (perturbation-kernel mean coefficient and
    std), ``_prior_std`` and ``_discretize_coefs(t) -> (f_coef, G)`` with f = f_coef x.
    """

    T = 1.0
    #: default stopping time of the samplers (score_sde): 1e-3 for VP/sub-VP, 1e-5 for VE.
    default_eps = 1e-3
    #: std of the prior N(0, prior_std^2 I); set by each subclass.
    _prior_std: float

    def __init__(self, N: int):
        if isinstance(N, (bool, np.bool_)) or not isinstance(N, (int, np.integer)):
            raise TypeError(f"N must be an integer number of discretization steps; got {N!r}")
        if N < 1:
            raise ValueError(f"N must be >= 1; got N = {N}")
        self.N = int(N)

    # -- coefficients on bare time (for the fused kernels and the oracle)
    def linear_drift_coef(self, t):
        """a(t) with f(x, t) = a(t) x; float64 of t's shape (numpy for float/numpy t, a tensor
        on t's device for tensor t)."""
        tt = check_time(t)
        return self._a(tt)

    def diffusion_coef(self, t):
        """g(t); float64 of t's shape (numpy for float/numpy t, a tensor for tensor t)."""
        tt = check_time(t)
        return self._g(tt)

    def marginal_coefs(self, t):
        """(m(t), s(t)) with p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I); float64 of t's shape."""
        tt = check_time(t)
        return self._marg(tt)

    # -- the score_sde interface
    def sde(self, x, t):
        """(drift, diffusion) = (a(t) x, g(t)); x: (B, ...); t: float or (B,), in [0, 1].
        drift has x's shape; diffusion has shape () or (B, 1, ..., 1)."""
        x = check_float(x, "x")
        tt = check_time(t, x)
        xc = upcast(x)
        return restore(broadcast_coef(self._a(tt), xc) * xc, x), restore(broadcast_coef(self._g(tt), xc), x)

    def marginal_prob(self, x0, t):
        """(mean, std) of p_0t(x_t | x_0) = N(m(t) x_0, s(t)^2 I) (Song et al. 2021, eq. 29; for
        VE the exact s(t)^2 = sigma(t)^2 - sigma_min^2, not eq. 31's sigma(t)^2).
        mean has x0's shape; std has shape () or (B, 1, ..., 1)."""
        x0 = check_float(x0, "x0")
        tt = check_time(t, x0)
        xc = upcast(x0)
        m, s = self._marg(tt)
        return restore(broadcast_coef(m, xc) * xc, x0), restore(broadcast_coef(s, xc), x0)

    def prior_sampling(self, shape, generator=None, dtype=None):
        """A draw from the prior N(0, prior_std^2 I) of ``shape`` (numpy float64 for a
        numpy.random.Generator or None, a float32 tensor on the generator's device for a
        torch.Generator unless ``dtype`` says otherwise)."""
        z = _prior_draw(shape, generator, dtype)
        return z * self._prior_std if self._prior_std != 1.0 else z

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I) per sample, summed over the non-batch dims; shape (B,):
        -D/2 log(2 pi prior_std^2) - ||z||^2 / (2 prior_std^2), D the number of non-batch
        elements. The constant is added once per sample, which is more precise than summing
        ``gaussian.normal_log_prob`` over the elements (measured in docs/numerics.md)."""
        z = check_float(z, "z")
        zc = upcast(z)
        D = int(np.prod(zc.shape[1:])) if zc.ndim > 1 else 1
        s2 = self._prior_std**2
        sum_sq = backend(zc).sum_over_non_batch(zc * zc)
        return restore(-0.5 * D * (LOG_2PI + math.log(s2)) - 0.5 * sum_sq / s2, z)

    def discretize(self, x, t):
        """(f, G) with x_{i+1} = x_i + f + G z the discrete chain of score_sde at index
        i = round(t (N - 1)). The default is the Euler-Maruyama step of size 1/N:
        f = f(x, t)/N, G = g(t)/sqrt(N)."""
        x = check_float(x, "x")
        tt = check_time(t, x)
        xc = upcast(x)
        fc, G = self._discretize_coefs(tt)
        return restore(broadcast_coef(fc, xc) * xc, x), restore(broadcast_coef(G, xc), x)

    # -- what each subclass defines, on float64 time arrays/tensors
    def _a(self, t):
        raise NotImplementedError(f"{type(self).__name__} does not define the drift coefficient _a(t)")

    def _g(self, t):
        raise NotImplementedError(f"{type(self).__name__} does not define the diffusion _g(t)")

    def _marg(self, t):
        raise NotImplementedError(f"{type(self).__name__} does not define the marginal coefficients _marg(t)")

    def _params(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} does not define _params()")

    def _discretize_coefs(self, t):
        return self._a(t) / self.N, self._g(t) * math.sqrt(1.0 / self.N)

    def _index(self, t):
        """i = round(t (N - 1)) as float64 (exact integers)."""
        v = t * (self.N - 1)
        return torch.round(v) if is_tensor(v) else np.round(v)

    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, prior_std^2 I): 1 for VP/sub-VP, sigma_max for VE."""
        return float(self._prior_std)

    def reverse(self, score_fn: Callable[[Any, Any], Any], probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE dx = [f - g^2 score] dt + g dw_bar (Song et al. 2021, eq. 6),
        or with ``probability_flow`` the ODE dx = [f - g^2 score / 2] dt (eq. 13).

        ``score_fn(x, t)`` gets x of shape (B, ...) and t of shape (B,) (float, x's kind) and
        must return an array of x's shape: the score grad_x log p_t(x)."""
        return ReverseSDE(self, score_fn, probability_flow)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}({self._params()}, N={self.N})"


# ----------------------------------------------------------------------------- VP / sub-VP
class VPSDE(SDE):
    """Variance-preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (Song et al. 2021,
    eq. 11), the continuous limit of DDPM. ``discretize`` is the DDPM forward chain
    x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z with beta_i = linspace(beta_min/N,
    beta_max/N, N)[i] (score_sde): f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        for name, v in (("beta_min", beta_min), ("beta_max", beta_max)):
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {name} = {v!r}")
        if not beta_max >= beta_min or beta_max <= 0:
            raise ValueError(
                f"need 0 < beta_max and beta_min <= beta_max; got beta_min = {beta_min}, beta_max = {beta_max}"
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    _prior_std = 1.0

    def _params(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _lmc(self, t):
        """log m(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2."""
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _a(self, t):
        return -0.5 * self._beta(t)

    def _g(self, t):
        return backend(t).sqrt(self._beta(t))

    def _marg(self, t):
        ops = backend(t)
        lmc = self._lmc(t)
        return ops.exp(lmc), ops.sqrt(-ops.expm1(2.0 * lmc))

    def discrete_betas(self) -> np.ndarray:
        """beta_i = linspace(beta_min/N, beta_max/N, N) (float64), the DDPM betas of ``discretize``."""
        return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def _discretize_coefs(self, t):
        if self.beta_max / self.N > 1.0:
            raise ValueError(
                f"VPSDE.discretize needs beta_max / N <= 1 (a valid DDPM beta); got beta_max = {self.beta_max}, "
                f"N = {self.N}; use N >= {math.ceil(self.beta_max)}"
            )
        ops = backend(t)
        i = self._index(t)
        step = (self.beta_max - self.beta_min) / (self.N * (self.N - 1)) if self.N > 1 else 0.0
        beta_i = self.beta_min / self.N + i * step
        # sqrt(1 - beta) - 1 = expm1(log1p(-beta)/2), no cancellation for tiny beta
        with np.errstate(divide="ignore"):
            return ops.expm1(0.5 * ops.log1p(-beta_i)), ops.sqrt(beta_i)


class SubVPSDE(VPSDE):
    """Sub-VP SDE dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw
    (Song et al. 2021, eq. 12); its variance (1 - exp(2 lmc))^2 stays below the VP one.
    ``discretize`` is the Euler-Maruyama step of size 1/N (score_sde's default)."""

    def _g(self, t):
        ops = backend(t)
        # 1 - exp(-2 int beta) = -expm1(4 lmc)
        return ops.sqrt(self._beta(t) * -ops.expm1(4.0 * self._lmc(t)))

    def _marg(self, t):
        ops = backend(t)
        lmc = self._lmc(t)
        return ops.exp(lmc), -ops.expm1(2.0 * lmc)

    def _discretize_coefs(self, t):
        return SDE._discretize_coefs(self, t)


# ----------------------------------------------------------------------------- VE
class VESDE(SDE):
    """Variance-exploding SDE dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw with
    sigma(t) = sigma_min (sigma_max/sigma_min)^t (Song et al. 2021, eq. 9 in the form of
    eq. 30), the continuous limit of SMLD/NCSN. ``discretize`` is the SMLD chain
    x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z with sigma_i = geomspace(sigma_min,
    sigma_max, N)[i], sigma_{-1} = 0:
    f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2). Marginal std: the exact sqrt(sigma(t)^2 -
    sigma_min^2) (see the module docstring); prior N(0, sigma_max^2 I)."""

    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {name} = {v!r}")
        if not sigma_max > sigma_min:
            raise ValueError(f"need sigma_min < sigma_max; got sigma_min = {sigma_min}, sigma_max = {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._L = math.log(self.sigma_max / self.sigma_min)
        self._prior_std = self.sigma_max

    def _params(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def sigma(self, t):
        """sigma(t) = sigma_min (sigma_max/sigma_min)^t; float64 of t's shape."""
        tt = check_time(t)
        return self.sigma_min * backend(tt).exp(tt * self._L)

    def _a(self, t):
        return t * 0.0

    def _g(self, t):
        return self.sigma_min * backend(t).exp(t * self._L) * math.sqrt(2.0 * self._L)

    def _marg(self, t):
        ops = backend(t)
        return t * 0.0 + 1.0, self.sigma_min * ops.sqrt(ops.expm1(2.0 * self._L * t))

    def discrete_sigmas(self) -> np.ndarray:
        """sigma_i = exp(linspace(log sigma_min, log sigma_max, N)) (float64), score_sde's ladder."""
        return np.exp(np.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def _discretize_coefs(self, t):
        ops = backend(t)
        i = self._index(t)
        h = self._L / (self.N - 1) if self.N > 1 else 0.0
        sigma_i = self.sigma_min * ops.exp(i * h)
        # sigma_i^2 - sigma_{i-1}^2 = sigma_i^2 (1 - exp(-2h)); sigma_{-1} = 0
        ratio = -math.expm1(-2.0 * h)
        G = sigma_i * ops.sqrt(ops.where(i > 0, ratio + 0.0 * i, 1.0 + 0.0 * i))
        return t * 0.0, G


# ----------------------------------------------------------------------------- reverse
class ReverseSDE:
    """The reverse-time SDE (or probability-flow ODE) of ``sde`` driven by ``score_fn``
    (Song et al. 2021, eq. 6 and 13), built by ``SDE.reverse``.

    sde(x, t)        -> (f - c g^2 score, 0 if probability_flow else g),  c = 1/2 or 1
    discretize(x, t) -> (f_d - c G^2 score, 0 if probability_flow else G),
    with (f_d, G) = forward ``sde.discretize``; the reverse-diffusion predictor steps
    x <- x - f_d + G^2 score + G z (Song et al. 2021, eq. 46-47).
    t must lie in (0, 1] (the score divides by the marginal std).
    """

    def __init__(self, sde: SDE, score_fn: Callable[[Any, Any], Any], probability_flow: bool = False) -> None:
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a diffmath.sde.SDE; got {type(sde).__name__}")
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable score_fn(x, t); got {type(score_fn).__name__}")
        self.forward = sde
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = sde.N
        self.T = sde.T

    def score(self, x, t):
        """score_fn(x, t) with t broadcast to shape (B,) in x's kind, its output checked."""
        tt = check_time(t, x, open_left=True)
        B = x.shape[0] if np.ndim(x) else 1
        if tt.ndim == 0:
            tt = tt.expand(B) if is_tensor(tt) else np.full(B, float(tt))
        if is_tensor(x):
            tt = tt.to(compute_dtype(x)) if x.dtype != torch.float64 else tt
        else:
            tt = tt.astype(x.dtype if x.dtype in (np.float32, np.float64) else np.float64)
        out = self.score_fn(x, tt)
        return check_score(out, x, "score_fn")

    def _c(self):
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x, t):
        x = check_float(x, "x")
        check_time(t, x, open_left=True)
        drift, g = self.forward.sde(x, t)
        score = self.score(x, t)
        d = upcast(drift) - self._c() * upcast(g) ** 2 * upcast(score)
        g_out = g * 0 if self.probability_flow else g
        return restore(d, x), g_out

    def discretize(self, x, t, t_score=None):
        """(f_d - c G^2 score(x, t_score), G or 0); t in [0, 1] is the chain's time (index
        round(t (N-1))), t_score in (0, 1] the score's (default t)."""
        x = check_float(x, "x")
        f, G = self.forward.discretize(x, t)
        score = self.score(x, t if t_score is None else t_score)
        rf = upcast(f) - self._c() * upcast(G) ** 2 * upcast(score)
        return restore(rf, x), (G * 0 if self.probability_flow else G)


def check_score(out: object, x: ArrayT, name: str = "score_fn") -> ArrayT:
    """The output of a score/eps model must be an array of x's kind, device and shape."""
    if not (is_tensor(out) or isinstance(out, np.ndarray)):
        raise TypeError(f"{name} must return an array like x (shape {tuple(x.shape)}); got {type(out).__name__}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{name} returned shape {tuple(out.shape)} but x has shape {tuple(x.shape)}; they must match")
    return check_like(out, x, f"the output of {name}", "x")


# ----------------------------------------------------------------------------- eps <-> score
def score_from_eps(sde: SDE, t: TimeLike, eps: ArrayT) -> ArrayT:
    """score = -eps / s(t), s(t) the SDE's marginal std (Song et al. 2021, App. B; the SDE
    analogue of ``parameterization.score_from_eps``). t in (0, 1]; eps: (B, ...)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffmath.sde.SDE; got {type(sde).__name__}")
    eps = check_float(eps, "eps")
    tt = check_time(t, eps, open_left=True)
    ec = upcast(eps)
    return restore(-ec / broadcast_coef(sde._marg(tt)[1], ec), eps)


def eps_from_score(sde: SDE, t: TimeLike, score: ArrayT) -> ArrayT:
    """eps = -s(t) score, the inverse of ``score_from_eps``. t in (0, 1]; score: (B, ...)."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a diffmath.sde.SDE; got {type(sde).__name__}")
    score = check_float(score, "score")
    tt = check_time(t, score, open_left=True)
    sc = upcast(score)
    return restore(-broadcast_coef(sde._marg(tt)[1], sc) * sc, score)
