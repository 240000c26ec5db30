"""A non-Gaussian judge: the KL(sampler output || data) of a sigma-space solver on 1-D mixture data.

Gaussian data make the exact denoiser affine, which flatters some solvers; a mixture of
Gaussians (``diffmath.oracle.GaussianMixture``) has a non-linear exact denoiser but still a
closed-form density and CDF, so a solver's output can still be judged without a network.

**Deterministic solvers: the change of variables, for masses** (``mixture_kl``). Driven by
the exact denoiser, a deterministic solver is a map y = f(x_T) of its start, which in 1-D is
increasing (it is a discretization of the probability-flow ODE, whose flow is; the judge checks
this on its grid and refuses a map that is not). Write x_T = s z, z ~ N(0, 1), s the start's
std. For nodes z_0 < ... < z_M with images y_j = f(s z_j) the change of variables moves each
cell's mass exactly:

    P_j = P(output in [y_j, y_{j+1}]) = Phi(z_{j+1}) - Phi(z_j)                      (no derivative)
    Q_j = P(data in [y_j, y_{j+1}])   = sum_k w_k (Phi((y_{j+1} - mu_k)/s_k) - Phi((y_j - mu_k)/s_k))

and with the two tail cells z < -L, z > L (mass Phi(-L) each) the cells partition the line. The
partitioned KL  K_M = sum_j P_j log(P_j / Q_j)  is a lower bound of KL(output || data) (the data
processing inequality) that increases to it under refinement; the gap is the within-cell KL,
sum_j P_j KL(p_out|cell j || p_data|cell j) = O(h^2) in the grid step h (a cell's conditional KL is
(1/24) (Delta y d/dy log(p_out/p_data))^2 + O(Delta y^3)). The judge halves h (the new midpoints only are pushed
through the solver, as one batch) until two successive values agree to ``tol``, and reports the
finest value with the error bound err = |K_{2M} - K_M|: with the O(h^2) gap, the remaining gap
after the finer grid is about err / 3 < err (the ratio of the last two increments, ~4 in the
asymptotic range, is reported too). All probabilities are computed in log space from
``scipy.special.log_ndtr`` on the side of the tail that keeps them accurate, so a cell of mass
1e-300 still has a correct log P_j. The tails beyond L = 10 carry Phi(-10) = 7.6e-24 each.

This is the change of variables p_out(y) = p_T(x) / f'(x) integrated over cells rather than
evaluated at points: it needs no derivative of f, so no finite-difference step to tune, and
its error is estimated by the grid itself (tests/core/test_judge.py checks it against the density
form with f' by finite differences, and against the closed-form Gaussian KL of a one-component
mixture).

**Stochastic solvers: Monte Carlo** (``mixture_kl_monte_carlo``). The output density is not
available: n runs are split into a pilot quarter, whose quantiles cut the line into m cells of
equal output mass (fine where the output is dense), and the other three quarters, binned into
those cells. The plug-in KL_hat = sum_j P_hat_j log(P_hat_j / Q_j) is taken against the exact data masses
Q_j, with the Miller-Madow correction -(m_occupied - 1) / (2n) for the upward bias of the plug-in
(Paninski 2003, "Estimation of entropy and mutual information", Sec. 3); its standard error is the
delta method's sqrt(Var_{P_hat}(log P_hat_j / Q_j) / n). What it estimates is the binned KL, a lower bound
of the true KL (data processing) that misses the within-cell KL; the result also carries the
binned KL at m / 2 cells, whose difference shows the size of that gap. Measured on the mixture
of tests/core/test_judge.py with DPM-Solver++(2M) at 10 steps (exact KL 0.11232 by ``mixture_kl``):
1.6e6 runs give 0.1098 / 0.1110 / 0.1113 / 0.1114 at m = 500 / 1000 / 2000 / 4000 (standard
error 5e-4), so the binning gap is ~1e-3 there; with cells of equal *data* mass it was ~8e-3.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr, logsumexp

from .oracle import GaussianMixture, solver_fn

__all__ = ["KLEstimate", "mixture_kl", "mixture_kl_monte_carlo", "solver_map", "log_interval_mass"]

TAIL_Z = 10.0  # the grid covers z in [-TAIL_Z, TAIL_Z]; each tail beyond holds Phi(-10) = 7.6e-24


@dataclass(frozen=True)
class KLEstimate:
    """kl: the estimate (nats); err: its stated error (``method`` says what it is);
    details: the numbers behind it (grid sizes, successive values, sample counts)."""

    kl: float
    err: float
    method: str
    details: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.kl)


# ----------------------------------------------------------------------------- exact masses
def log_interval_mass(a, b):
    """log(Phi(b) - Phi(a)) for a <= b elementwise (standard normal CDF Phi), accurate in both
    tails and for narrow intervals: on the side of 0 where both ends lie it uses the smaller
    tail, log Phi(b) + log(-expm1(log Phi(a) - log Phi(b))) (reflected for a > 0); an interval that
    straddles 0 has mass > Phi(b) - 1/2 and is computed directly. -inf where a == b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = np.broadcast_arrays(a, b)
    up = a > 0  # both ends above 0: reflect, Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo_ = np.where(up, -b, a)
    hi_ = np.where(up, -a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        lh, ll = log_ndtr(hi_), log_ndtr(lo_)
        out = lh + np.log(-np.expm1(ll - lh))
        straddle = (a <= 0) & (b > 0)
        if straddle.any():  # both sides: Phi(b) - Phi(a) = (1 - Phi(-b)) - Phi(a), each term <= 1/2
            mid = -np.expm1(log_ndtr(-b[straddle])) - np.exp(log_ndtr(a[straddle]))
            out[straddle] = np.log(mid)
    return np.where(a == b, -np.inf, out)


def _log_data_mass(mix: GaussianMixture, lo, hi):
    """log P(data in [lo, hi]) for a 1-D mixture, per cell (logsumexp over components)."""
    sd = np.sqrt(mix.covs[:, 0, 0])
    terms = [
        mix._log_w[k] + log_interval_mass((lo - mix.means[k, 0]) / sd[k], (hi - mix.means[k, 0]) / sd[k])
        for k in range(len(mix.weights))
    ]
    with np.errstate(divide="ignore"):
        return logsumexp(np.stack(terms, 0), axis=0)


# ----------------------------------------------------------------------------- the solver's map
def _check_mixture(mix):
    if not isinstance(mix, GaussianMixture) or mix.dim != 1:
        raise TypeError(f"data must be a 1-D diffmath.oracle.GaussianMixture; got {mix!r}")
    return mix


def _start_std(start, sig) -> float:
    if start is None:
        return float(sig[0])
    if isinstance(start, (bool, np.bool_)) or not isinstance(start, numbers.Real):
        raise TypeError(f"start must be None or the std of the start N(0, start^2); got {start!r}")
    s = float(start)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"start must be a finite std > 0; got start = {s}")
    return s


def solver_map(data, solver, sigmas, *, chunk: int = 1 << 17, **options):
    """f: the deterministic map x_T -> output of ``solver`` driven by ``data.denoise`` (float64
    numpy), as a function of a 1-D array of starts, evaluated in chunks of ``chunk`` rows (the
    solvers act row by row, so a batch is many independent runs). A solver that asks for noise
    raises: use ``mixture_kl_monte_carlo``."""
    from .samplers.solvers import check_sigmas

    fn = solver_fn(solver)
    sig = check_sigmas(sigmas)
    kw = dict(options)
    if "noise_sampler" in inspect.signature(fn).parameters:

        def refuse(sigma, sigma_next):
            raise ValueError(
                "the solver draws noise with these options, so its map is not deterministic; "
                "use mixture_kl_monte_carlo for a stochastic solver"
            )

        kw["noise_sampler"] = refuse

    def f(x):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        out = np.empty_like(x)
        for i in range(0, x.size, chunk):
            out[i : i + chunk] = np.asarray(fn(data.denoise, x[i : i + chunk, None], sig, **kw), dtype=np.float64)[:, 0]
        return out

    return f


def _cell_terms(data, zl, zh, yl, yh):
    """P_j log(P_j / Q_j) for the cells [zl, zh] -> [yl, yh] (0 where P_j = 0; inf where Q_j = 0 < P_j)."""
    logP = log_interval_mass(zl, zh)
    logQ = _log_data_mass(data, yl, yh)
    with np.errstate(invalid="ignore"):
        t = np.exp(logP) * (logP - logQ)
    t = np.where(np.isfinite(logP), t, 0.0)
    return np.where(np.isfinite(logP) & ~np.isfinite(logQ), np.inf, t)


def mixture_kl(
    data,
    solver,
    sigmas,
    *,
    start=None,
    tol: float = 1e-7,
    rtol: float = 0.0,
    n0: int = 1024,
    max_nodes: int = 1 << 21,
    **options,
) -> KLEstimate:
    """KL(output || data) of a deterministic sigma-space ``solver`` (a ``diffmath.samplers``
    solver, its name, or any callable with that convention) driven by the exact denoiser of the
    1-D mixture ``data``, from x_T ~ N(0, start^2) (start = sigmas[0] by default), by the change
    of variables on cell masses (module docstring), on an adaptively refined grid.

    Nodes z start uniform on [-10, 10] (``n0`` cells); every cell also has its midpoint
    evaluated, and its gain g_j = (partitioned KL with the cell halved) - (with it whole) >= 0.
    While sum_j g_j > max(``tol``, ``rtol`` KL) (default 1e-7 nats absolute), the cells with the
    largest gains are halved
    (those whose removal leaves sum <= tol / 2) and their halves' midpoints evaluated, all new
    starts as one batch. The result is the partitioned KL on every node evaluated (the finest
    partition) and err = sum_j g_j, the difference between it and the partition one refinement
    coarser (under the O(h^2) convergence, the remaining gap is ~err / 3). Returns a
    ``KLEstimate`` with details {"nodes", "rounds", "converged"}. Raises ValueError if the map is
    not increasing on the grid."""
    from .samplers.solvers import check_sigmas

    data = _check_mixture(data)
    sig = check_sigmas(sigmas)
    s = _start_std(start, sig)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0; got tol = {tol!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0; got rtol = {rtol!r}")
    for name, v, lo in (("n0", n0, 16), ("max_nodes", max_nodes, 64)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {name} = {v!r}")
    f = solver_map(data, solver, sig, **options)

    z = np.linspace(-TAIL_Z, TAIL_Z, int(n0) + 1)  # the coarse nodes
    zm = 0.5 * (z[:-1] + z[1:])  # each cell's midpoint
    y_all = f(s * np.concatenate([z, zm]))
    y, ym = y_all[: z.size], y_all[z.size :]
    rounds = 1
    while True:
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(ym))):
            raise ValueError("the solver returned a non-finite output on the grid")
        zf = np.empty(z.size + zm.size)
        yf = np.empty_like(zf)
        zf[0::2], zf[1::2] = z, zm
        yf[0::2], yf[1::2] = y, ym
        dy = np.diff(yf)
        if np.any(dy <= 0):
            j = int(np.argmax(dy <= 0))
            raise ValueError(
                f"the solver's map x_T -> output is not increasing (f({s * zf[j]:.6g}) = {yf[j]:.6g} >= "
                f"f({s * zf[j + 1]:.6g}) = {yf[j + 1]:.6g}): the change of variables does not apply"
            )
        whole = _cell_terms(data, z[:-1], z[1:], y[:-1], y[1:])
        halves = _cell_terms(data, zf[:-1], zf[1:], yf[:-1], yf[1:])
        gain = np.abs(halves[0::2] + halves[1::2] - whole)
        gain = np.where(np.isfinite(gain), gain, np.inf)
        err = float(gain.sum())
        goal = max(tol, rtol * float(np.sum(halves[np.isfinite(halves)])))
        if err <= goal or zf.size >= max_nodes or not math.isfinite(err):
            break
        # halve the cells with the largest gains, keeping the rest's sum <= goal / 2
        order = np.argsort(gain)  # ascending
        keep = np.cumsum(gain[order]) <= 0.5 * goal
        split = np.zeros(gain.size, dtype=bool)
        split[order[~keep]] = True
        # the new coarse grid: old nodes plus the midpoints of the split cells
        new_nodes = np.concatenate([z, zm[split]])
        new_y = np.concatenate([y, ym[split]])
        o = np.argsort(new_nodes, kind="stable")
        z_new, y_new = new_nodes[o], new_y[o]
        # midpoints: known for the unsplit cells, new for the halves of the split ones
        mids = 0.5 * (z_new[:-1] + z_new[1:])
        known = np.zeros(mids.size, dtype=bool)
        ym_new = np.empty(mids.size)
        pos = np.searchsorted(z_new, z[:-1][~split])  # the unsplit cells keep their left node
        known[pos] = True
        ym_new[pos] = ym[~split]
        ym_new[~known] = f(s * mids[~known])
        z, y, zm, ym = z_new, y_new, mids, ym_new
        rounds += 1
    tails = _cell_terms(
        data,
        np.array([-np.inf, zf[-1]]),
        np.array([zf[0], np.inf]),
        np.array([-np.inf, yf[-1]]),
        np.array([yf[0], np.inf]),
    )
    kl = float(halves.sum() + tails.sum())
    return KLEstimate(
        kl=kl,
        err=err,
        method="change of variables on cell masses, adaptive grid; err = KL(finest) - KL(one refinement coarser)",
        details={"nodes": int(zf.size), "rounds": rounds, "converged": err <= goal, "start_std": s},
    )


# ----------------------------------------------------------------------------- Monte Carlo
def _binned_plugin(y, edges, logQ):
    """(plug-in KL, Miller-Madow corrected KL, delta-method standard error, occupied bins)."""
    n = y.size
    counts = np.bincount(np.searchsorted(edges, y, side="right"), minlength=edges.size + 1)
    P = counts / n
    occ = P > 0
    if np.any(~np.isfinite(logQ[occ])):
        return math.inf, math.inf, math.inf, int(occ.sum())
    lr = np.log(P[occ]) - logQ[occ]
    plug = float(np.sum(P[occ] * lr))
    m = int(occ.sum())
    se = math.sqrt(max(float(np.sum(P[occ] * lr * lr)) - plug * plug, 0.0) / n)
    return plug, plug - (m - 1) / (2.0 * n), se, m


def mixture_kl_monte_carlo(
    data,
    solver,
    sigmas,
    *,
    n: int = 1_000_000,
    bins: int = 2000,
    generator=None,
    start=None,
    chunk: int = 1 << 17,
    **options,
) -> KLEstimate:
    """Monte Carlo KL(output || data) of any sigma-space ``solver`` (stochastic ones included)
    on the 1-D mixture ``data`` with its exact denoiser, from x_T ~ N(0, start^2): ``n`` runs
    (in chunks of ``chunk``, noise from the numpy ``generator``); a quarter of them place
    ``bins`` cells of equal output mass, the rest are binned against the exact data masses
    (module docstring).

    Returns a ``KLEstimate``: kl = the Miller-Madow corrected plug-in, err = its standard error
    (a 5-err z-test is what tests/core/test_judge.py uses), details {"n", "bins", "plugin",
    "kl_half_bins" (the same with bins / 2 cells: the binned KL grows toward the true KL as the
    bins shrink, so the difference shows the binning gap), "occupied"}."""
    from .checks import check_generator
    from .samplers.solvers import check_sigmas

    data = _check_mixture(data)
    sig = check_sigmas(sigmas)
    s = _start_std(start, sig)
    for name, v, lo in (("n", n, 100), ("bins", bins, 4)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {name} = {v!r}")
    if bins % 2:
        raise ValueError(f"bins must be even (the gap estimate halves it); got bins = {bins}")
    g = check_generator(generator)
    if not isinstance(g, np.random.Generator):
        raise TypeError("generator must be a numpy.random.Generator (the judge runs the solver on numpy float64)")
    fn = solver_fn(solver)
    y = np.empty(int(n))
    for i in range(0, int(n), chunk):
        m = min(chunk, int(n) - i)
        x = s * g.standard_normal((m, 1))
        y[i : i + m] = np.asarray(fn(data.denoise, x, sig, generator=g, **options), dtype=np.float64)[:, 0]
    if not np.all(np.isfinite(y)):
        raise ValueError("the solver returned a non-finite output")

    # the cells: quantiles of a pilot quarter of the runs (equal output mass, so the cells are
    # fine where the output is dense), the KL on the other three quarters (independent of them)
    pilot, rest = y[: y.size // 4], y[y.size // 4 :]

    def binned(m):
        edges = np.unique(np.quantile(pilot, np.arange(1, m) / m))
        lo = np.concatenate([[-np.inf], edges])
        hi = np.concatenate([edges, [np.inf]])
        return _binned_plugin(rest, edges, _log_data_mass(data, lo, hi))

    plug, kl, se, occ = binned(int(bins))
    _, kl_half, _, _ = binned(int(bins) // 2)
    return KLEstimate(
        kl=kl,
        err=se,
        method=f"Monte Carlo, {int(n)} runs, {int(bins)} cells of equal output mass (Miller-Madow); "
        "err = standard error",
        details={
            "n": int(n),
            "bins": int(bins),
            "plugin": plug,
            "kl_half_bins": kl_half,
            "occupied": occ,
            "start_std": s,
        },
    )
