"""``diffmath verify``: the sampler-accuracy table, computed exactly with the oracle.

The layout is Table 1 of the DDIM paper (Song, Meng & Ermon 2021) with the exact
KL(sampler output || data) in nats in place of FID: data N(0.5, 0.1^2) in 1-D,
``linear_schedule(1000)``, leading spacing, the exact eps of ``diffmath.oracle``, start
x_T ~ N(0, 1), final step to abar = 1, no clipping. Rows: DDIM with eta in {0, 0.2, 0.5, 1}
and ``ddpm_large`` (DDPM with variance 1 - abar_t/abar_prev on the respaced chain);
columns: 10, 20, 50, 100, 1000 steps. For Gaussian data every one of these samplers is
linear-Gaussian, so its output is Gaussian and the KL is closed-form
(``GaussianData.exact_output`` + ``gaussian_kl``): no Monte Carlo.

The ``"sde"`` table does the same for ``VPSDE()`` from t = 1 to 1e-3 in the column's number
of uniform steps (same data, prior N(0, 1)): Euler-Maruyama (``sample_sde``, last step
noise-free), predictor-corrector (Euler-Maruyama predictor + one Langevin corrector step,
snr = 0.16) and Heun on the probability-flow ODE (``sample_ode_heun``).

The predictor-corrector row is exact too. score_sde's adaptive corrector step
2 alpha (snr ||z|| / ||score||)^2 uses the *batch means* of the norms; in the limit of a large
batch the step is a deterministic function of the current Gaussian (``expected_norm``), the
corrector is linear-Gaussian and the output exact (``GaussianData.exact_sde_output``; the
Monte Carlo agreement is asserted in tests/core/test_oracle.py). With a *per-sample* step in 1-D
the output is heavy-tailed (P(|x| > r) ~ c / r, from ||score|| -> 0 near the mode), so its KL
to the data is +infinity: no finite Monte Carlo number would mean anything (see
docs/samplers.md).

``--nfe 5,10,20,50`` adds the few-step tables (``compute_nfe_tables``): the sigma-space solvers
of ``diffmath.samplers`` by **number of model evaluations** (NFE), sigma from sigma_min to
sigma_max of ``linear_schedule(1000)`` (0.0100005 to 157.41), start x_T ~ N(0, sigma_max^2), the
exact denoiser. Each row runs on the ladder that serves it best among Karras (rho = 7) and
exponential, chosen per row (not per cell) as the one with the smaller mean log KL over the
columns, and named in the table. Heun counts 2 evaluations per level except the last (an Euler
step to 0), so it gets n = (NFE + 1) // 2 levels: exactly NFE when NFE is odd, NFE - 1 when it
is even (said in the table); every other solver makes one evaluation per level (UniPC's
corrector reuses the next level's evaluation). On the Gaussian data the KL is exact
(``GaussianData.exact_solver_output``); on the 1-D mixture ``MIXTURE`` the deterministic rows are
judged by the change of variables (``diffmath.judge.mixture_kl``, quadrature error <= 1e-7
nats, or 1e-8 relative where the KL exceeds 10 nats, stated per cell in the JSON; a map that
folds, i.e. is not monotone, which few large steps of a high-order solver can produce, is
reported as "fold" / null).

The ``"precision"`` table measures the loops' precision policy (docs/samplers.md, "Precision
of the loop state"): for each deterministic loop (DDIM with eta = 0 on ``linear_schedule(1000)``,
Heun on ``VPSDE()``'s probability flow) at 50 and 1000 steps, the KL to the data of the output
of the real loop driven by the exact model rounded to float32, bfloat16 or float16 (the exact
eps for DDIM, the exact score for Heun, computed in float64 from the loop's state and then
rounded, as a half-precision network returns it), started from x_T rounded to the same
dtype. Rounding is not affine, so the output is not exactly Gaussian: the value is the KL of
the moment-matched Gaussian (the true KL exceeds it by the output's own non-Gaussianity),
from 20,000 draws of x_T, estimated against the float64 loop run on the same draws (whose
output law the oracle gives exactly): mean = exact mean + mean(y - y64), var = exact var +
var(y) - var(y64). The draws cancel, so the standard error (delta method, printed and in
``precision_se``) is orders of magnitude below a plain Monte Carlo fit's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["run", "main", "compute_nfe_tables", "STEPS", "ETAS", "NFES", "NFE_ROWS", "MIXTURE"]

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0)
SDE_ROWS = ("euler_maruyama", "predictor_corrector", "probability_flow_heun")
DATA_MEAN, DATA_STD = 0.5, 0.1
SNR = 0.16
SDE_EPS = 1e-3
NFES = (5, 10, 20, 50)
# (row, solver, options); a row that draws noise is judged on the Gaussian data only
NFE_ROWS = (
    ("euler", "euler", {}),
    ("heun", "heun", {}),
    ("euler_ancestral", "euler_ancestral", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {}),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}),
    ("dpmpp_3m", "dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_3m_damped", "dpmpp_3m_sde", {"eta": 0.0, "third_order": "damped"}),
    ("unipc", "unipc", {}),
    ("unipc_order3", "unipc", {"order": 3}),
    ("lms", "lms", {}),
)
STOCHASTIC_ROWS = ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")
LADDERS = ("karras", "exponential")
# the 1-D mixture of the non-Gaussian table: two modes with a deep gap (density ratio ~1e-4)
MIXTURE = {"weights": (0.3, 0.7), "means": (-0.5, 0.5), "std": 0.1}
MIXTURE_TOL = 1e-7  # nats, absolute ...
MIXTURE_RTOL = 1e-8  # ... or relative where that is larger (KL > 10 nats)
MIXTURE_MAX_NODES = 1 << 20
PRECISION_LOOPS = ("ddim", "probability_flow_heun")
PRECISION_DTYPES = ("float32", "bfloat16", "float16")
PRECISION_STEPS = (50, 1000)
PRECISION_N = 20_000
PRECISION_SEED = 0


def compute_tables(steps=STEPS, progress: bool = False) -> dict:
    """The two tables as nested dicts {row: {str(steps): kl}} (exact, in nats)."""
    from tqdm.auto import tqdm

    from .oracle import GaussianData
    from .schedules import linear_schedule
    from .sde import VPSDE

    data = GaussianData([DATA_MEAN], [[DATA_STD**2]])
    s = linear_schedule(1000)
    sde = VPSDE()
    leading = {f"eta={e:.1f}": {} for e in ETAS}
    leading["ddpm_large"] = {}
    sde_tab = {r: {} for r in SDE_ROWS}
    cells = [(n, kind) for n in steps for kind in list(leading) + list(SDE_ROWS)]
    for n, kind in tqdm(cells, disable=not progress, desc="verify", leave=False):
        if kind.startswith("eta="):
            out = data.exact_output(s, "ddim", n, eta=float(kind[4:]), spacing="leading")
            leading[kind][str(n)] = out.kl(data)
        elif kind == "ddpm_large":
            out = data.exact_output(s, "ddpm", n, spacing="leading", variance="large")
            leading[kind][str(n)] = out.kl(data)
        else:
            out = data.exact_sde_output(sde, kind, n, eps=SDE_EPS, snr=SNR, n_corrector_steps=1)
            sde_tab[kind][str(n)] = out.kl(data)
    floor = data.exact_sde_output(sde, "probability_flow", eps=SDE_EPS).kl(data)
    return {"tables": {"leading": leading, "sde": sde_tab}, "sde_floor": floor}


def _affine_model(fn):
    """``fn(x, t)`` (the oracle's exact eps or score, float64) for the loops, which call it with
    one t for the whole batch: for Gaussian data it is affine in x, so its slope and intercept
    are read once per t from ``fn`` itself at x = 0 and x = 1 and reused (the 4 runs of a cell
    share them). Returns float64 of x's shape."""
    import torch

    cache = {}

    def model(x, t):
        key = t.reshape(-1)[0].item()
        if key not in cache:
            v = fn(torch.tensor([[0.0], [1.0]], dtype=torch.float64), t.reshape(-1)[:1].repeat(2))
            cache[key] = (float(v[1, 0] - v[0, 0]), float(v[0, 0]))
        a, b = cache[key]
        return x.to(torch.float64) * a + b

    return model


def _kl_same_draws(y, y64, exact, data):
    """(KL, standard error) of N(m, v) to the 1-D ``data``, with m = exact.mean + mean(y - y64)
    and v = exact.var + var(y) - var(y64): the moments of the output y of a low-precision loop,
    estimated against the float64 loop's output y64 on the same draws, whose law ``exact`` is
    known. KL(N(m, v) || N(mu0, v0)) = log(sqrt(v0 / v)) + (v + (m - mu0)^2) / (2 v0) - 1/2;
    the standard error is the delta method's, from the per-draw influence of (m, v)."""
    import math

    y = y.detach().double().cpu().numpy().reshape(-1)
    x = y64.detach().double().cpu().numpy().reshape(-1)
    n = y.size
    mu0, v0 = float(data.mean[0]), float(data.cov[0, 0])
    d = y - x
    m = float(exact.mean[0]) + d.mean()
    v = float(exact.cov[0, 0]) + (y.var() - x.var())
    kl = 0.5 * math.log(v0 / v) + (v + (m - mu0) ** 2) / (2 * v0) - 0.5
    infl_m = d - d.mean()
    infl_v = (y - y.mean()) ** 2 - (x - x.mean()) ** 2 - (y.var() - x.var())
    g = (m - mu0) / v0 * infl_m + (0.5 / v0 - 0.5 / v) * infl_v
    return kl, float(g.std() / math.sqrt(n))


def compute_precision(
    steps=PRECISION_STEPS, n: int = PRECISION_N, seed: int = PRECISION_SEED, progress: bool = False
) -> dict:
    """The precision table (module docstring): ``{"precision": {loop: {dtype: {str(steps): kl}}},
    "precision_se": (same layout), "precision_float64": {loop: {str(steps): exact kl}}}``."""
    import torch

    from .oracle import GaussianData
    from .schedules import linear_schedule
    from .sde import VPSDE

    data = GaussianData([DATA_MEAN], [[DATA_STD**2]])
    s = linear_schedule(1000)
    sde = VPSDE()
    x_T = torch.randn((n, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tab = {loop: {dt: {} for dt in PRECISION_DTYPES} for loop in PRECISION_LOOPS}
    se = {loop: {dt: {} for dt in PRECISION_DTYPES} for loop in PRECISION_LOOPS}
    f64 = {loop: {} for loop in PRECISION_LOOPS}
    cells = [(loop, k) for loop in PRECISION_LOOPS for k in steps]
    # Vectors of 20,000 numbers: more threads only add synchronisation, and on busy shared cores
    # waiting OpenMP threads make each of the ~10,000 small steps many times slower (measured 15x).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _precision_cells(cells, data, s, sde, x_T, tab, se, f64, progress)
    finally:
        torch.set_num_threads(threads)
    return {"precision": tab, "precision_se": se, "precision_float64": f64}


def _precision_cells(cells, data, s, sde, x_T, tab, se, f64, progress):
    import torch
    from tqdm.auto import tqdm

    from .samplers import sample_ddim, sample_ode_heun

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for loop, k in tqdm(cells, disable=not progress, desc="verify (precision)", leave=False):
        if loop == "ddim":
            exact = data.exact_output(s, "ddim", k, eta=0.0, spacing="leading")
            fn = _affine_model(lambda x, t: data.eps(x, t, s))

            def run(x, dt, k=k, fn=fn):
                return sample_ddim(lambda x_t, t: fn(x_t, t).to(dt), s, steps=k, eta=0.0, spacing="leading", x_T=x)
        else:
            exact = data.exact_sde_output(sde, "probability_flow_heun", k, eps=SDE_EPS)
            fn = _affine_model(lambda x, t: data.score(x, t, sde))

            def run(x, dt, k=k, fn=fn):
                return sample_ode_heun(lambda x_t, t: fn(x_t, t).to(dt), sde, steps=k, eps=SDE_EPS, x_T=x)

        y64 = run(x_T, torch.float64)
        f64[loop][str(k)] = exact.kl(data)
        for name in PRECISION_DTYPES:
            dt = dtypes[name]
            y = run(x_T.to(dt), dt)
            tab[loop][name][str(k)], se[loop][name][str(k)] = _kl_same_draws(y, y64, exact, data)


def _format_precision(result: dict) -> list:
    p, se, ex = result["precision"], result["precision_se"], result["precision_float64"]
    cols = list(next(iter(next(iter(p.values())).values())))
    w = 12
    lines = [
        "",
        "Precision of the loop state: KL with the exact model rounded to each dtype (x_T rounded too; the state stays "
        "float32),",
        f"moment-matched Gaussian fit of {PRECISION_N} draws against the float64 loop on the same draws "
        "(largest standard error below)",
        f"{'steps':<40}" + "".join(f"{c:>{w}}" for c in cols),
    ]
    worst = 0.0
    for loop in p:
        lines.append(f"{loop + ' float64 (exact)':<40}" + "".join(f"{ex[loop][c]:>{w}.3e}" for c in cols))
        for dt, vals in p[loop].items():
            lines.append(f"{loop + ' ' + dt:<40}" + "".join(f"{vals[c]:>{w}.3e}" for c in cols))
            worst = max([worst] + list(se[loop][dt].values()))
    lines.append(f"largest standard error of a cell: {worst:.1e} nats")
    return lines


def _format(result: dict, steps, seconds: float) -> str:
    tabs = result["tables"]
    cols = [str(n) for n in steps]
    w = 12
    lines = [
        "diffmath verify: exact KL(sampler output || data) in nats (lower is better)",
        f"data N({DATA_MEAN}, {DATA_STD}^2), exact eps/score from diffmath.oracle, start N(0, 1); no Monte Carlo",
        "",
        "DDIM / DDPM, linear_schedule(1000), leading spacing (layout of DDIM Table 1)",
        f"{'steps':<22}" + "".join(f"{c:>{w}}" for c in cols),
    ]
    for row, vals in tabs["leading"].items():
        lines.append(f"{row:<22}" + "".join(f"{vals[c]:>{w}.3e}" for c in cols))
    lines += [
        "",
        f"VPSDE(), t = 1 -> {SDE_EPS} in uniform steps",
        f"{'steps':<22}" + "".join(f"{c:>{w}}" for c in cols),
    ]
    for row, vals in tabs["sde"].items():
        lines.append(f"{row:<22}" + "".join(f"{vals[c]:>{w}.3e}" for c in cols))
    lines += [
        "",
        f"limit of the probability-flow row (the exact flow, stopped at t = {SDE_EPS}, from prior N(0, 1); "
        f"the stochastic rows can end below it, see docs/samplers.md): "
        f"{result['sde_floor']:.3e}",
        f"predictor_corrector: Euler-Maruyama predictor + 1 Langevin corrector step, snr = {SNR}, exact: "
        "score_sde's batch-mean step (sample_pc's default) in the large-batch limit (deterministic, so the chain stays "
        "Gaussian).",
        "  With a per-sample step the 1-D output has tails P(|x| > r) ~ c/r and KL = +inf (docs/samplers.md).",
    ]
    if "precision" in result:
        lines += _format_precision(result)
    lines.append(f"computed in {seconds:.2f} s")
    return "\n".join(lines)


def _plot(result: dict, steps, path: str, nfes=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if nfes:
        fig, grid = plt.subplots(2, 2, figsize=(11, 8.4))
        axes = grid[0]
        _plot_nfe(grid[1], result, nfes)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, title) in zip(axes, (("leading", "DDIM / DDPM (leading spacing)"), ("sde", "VPSDE solvers"))):
        for row, vals in result["tables"][key].items():
            ax.loglog(list(steps), [max(vals[str(n)], 1e-300) for n in steps], marker="o", label=row)
        if key == "sde":
            ax.axhline(result["sde_floor"], color="gray", ls=":", label="exact flow (ODE row's limit)")
        ax.set_xlabel("steps")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("exact KL(output || data) [nats]")
    fig.suptitle(f"diffmath verify: data N({DATA_MEAN}, {DATA_STD}$^2$), exact eps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def nfe_levels(row: str, nfe: int) -> int:
    """Noise levels (before the final 0) for ``nfe`` model evaluations: n = NFE for the one-call
    solvers, n = (NFE + 1) // 2 for Heun (2n - 1 evaluations)."""
    return (nfe + 1) // 2 if row == "heun" else nfe


def _ladder(kind: str, n: int, smin: float, smax: float):
    from .samplers import sigmas_exponential, sigmas_karras

    return sigmas_karras(n, smin, smax, rho=7.0) if kind == "karras" else sigmas_exponential(n, smin, smax)


def _pick(cells: dict) -> str:
    """The ladder whose row has the smaller mean log KL (ties: the first); a folded cell (None)
    counts as +inf."""
    import math

    def score(row):
        return sum(math.inf if v is None else math.log(max(v, 1e-300)) for v in row.values()) / len(row)

    return min(cells, key=lambda k: score(cells[k]))


def compute_nfe_tables(nfes=NFES, progress: bool = False) -> dict:
    """The few-step tables (module docstring): {"nfe": {row: {str(nfe): kl}}, "nfe_ladders":
    {row: ladder}, "nfe_evaluations": {row: {str(nfe): evaluations}}, "nfe_mixture": {row:
    {str(nfe): kl}}, "nfe_mixture_err": {row: {str(nfe): quadrature error}},
    "nfe_mixture_ladders": {row: ladder}}, every ladder tried in "nfe_all" / "nfe_mixture_all"."""
    from tqdm.auto import tqdm

    from .judge import mixture_kl
    from .oracle import GaussianData, GaussianMixture
    from .schedules import linear_schedule

    s = linear_schedule(1000)
    smin, smax = float(s.sqrt_recipm1_alphas_cumprod[0]), float(s.sqrt_recipm1_alphas_cumprod[-1])
    data = GaussianData([DATA_MEAN], [[DATA_STD**2]])
    mix = GaussianMixture(
        list(MIXTURE["weights"]), [[m] for m in MIXTURE["means"]], [[[MIXTURE["std"] ** 2]]] * len(MIXTURE["weights"])
    )
    gauss = {row: {lad: {} for lad in LADDERS} for row, _, _ in NFE_ROWS}
    mixt = {row: {lad: {} for lad in LADDERS} for row, _, _ in NFE_ROWS if row not in STOCHASTIC_ROWS}
    merr = {row: {lad: {} for lad in LADDERS} for row in mixt}
    evals = {row: {str(n): 2 * nfe_levels(row, n) - 1 if row == "heun" else n for n in nfes} for row, _, _ in NFE_ROWS}
    cells = [(row, solver, opts, lad, n) for row, solver, opts in NFE_ROWS for lad in LADDERS for n in nfes]
    for row, solver, opts, lad, n in tqdm(cells, disable=not progress, desc="verify --nfe", leave=False):
        sig = _ladder(lad, nfe_levels(row, n), smin, smax)
        gauss[row][lad][str(n)] = data.exact_solver_output(solver, sig, **opts).kl(data)
        if row in mixt:
            try:
                r = mixture_kl(
                    mix, solver, sig, tol=MIXTURE_TOL, rtol=MIXTURE_RTOL, max_nodes=MIXTURE_MAX_NODES, **opts
                )
                mixt[row][lad][str(n)], merr[row][lad][str(n)] = r.kl, r.err
            except ValueError as e:  # a folded map: few large high-order steps can overshoot
                if "not increasing" not in str(e):
                    raise
                mixt[row][lad][str(n)], merr[row][lad][str(n)] = None, None
    best_g = {row: _pick(gauss[row]) for row in gauss}
    best_m = {row: _pick(mixt[row]) for row in mixt}
    return {
        "nfe": {row: gauss[row][best_g[row]] for row in gauss},
        "nfe_ladders": best_g,
        "nfe_evaluations": evals,
        "nfe_mixture": {row: mixt[row][best_m[row]] for row in mixt},
        "nfe_mixture_err": {row: merr[row][best_m[row]] for row in mixt},
        "nfe_mixture_ladders": best_m,
        "nfe_all": gauss,
        "nfe_mixture_all": mixt,
    }


def _format_nfe(res: dict, nfes) -> str:
    cols = [str(n) for n in nfes]
    w = 14
    heun = ", ".join(f"{res['nfe_evaluations']['heun'][c]}" for c in cols)
    lines = [
        "",
        "Few-step solvers by model evaluations (NFE), exact KL in nats; sigma in [0.0100005, 157.41] "
        "(linear_schedule(1000)), start N(0, sigma_max^2)",
        f"each row on its best ladder of {', '.join(LADDERS)} (rho = 7), chosen per row by mean log KL; "
        f"heun: 2n - 1 evaluations, i.e. {heun} (the nearest at or below each column)",
    ]
    for key, title, lad_key in (
        (
            "nfe",
            f"Gaussian data N({DATA_MEAN}, {DATA_STD}^2), exact (affine map identified by running the solver)",
            "nfe_ladders",
        ),
        (
            "nfe_mixture",
            f"1-D mixture {MIXTURE['weights']} x N({MIXTURE['means']}, {MIXTURE['std']}^2), deterministic "
            "solvers, change of "
            f"variables (quadrature error <= {MIXTURE_TOL:.0e} nats or {MIXTURE_RTOL:.0e} x KL, at most "
            f"{_max_err(res):.1e}; "
            "fold: the map x_T -> output is not monotone)",
            "nfe_mixture_ladders",
        ),
    ):
        lines += ["", title, f"{'solver':<16}{'ladder':<13}" + "".join(f"{c:>{w}}" for c in cols)]
        for row, vals in res[key].items():
            lines.append(f"{row:<16}{res[lad_key][row]:<13}" + "".join(_cell(vals[c], w) for c in cols))
        best = {c: min((r for r in res[key] if res[key][r][c] is not None), key=lambda r: res[key][r][c]) for c in cols}
        lines.append(f"{'best':<29}" + "".join(f"{best[c]:>{w}}" for c in cols))
    return "\n".join(lines)


def _cell(v, w: int) -> str:
    return f"{'fold':>{w}}" if v is None else f"{v:>{w}.3e}"


def _max_err(res: dict) -> float:
    errs = [v for r in res["nfe_mixture_err"].values() for v in r.values() if v is not None]
    return max(errs) if errs else 0.0


def _plot_nfe(axes, res: dict, nfes) -> None:
    for ax, key, lad_key, title in (
        (axes[0], "nfe", "nfe_ladders", "few-step solvers, Gaussian data"),
        (axes[1], "nfe_mixture", "nfe_mixture_ladders", "few-step solvers, 1-D mixture"),
    ):
        for row, vals in res[key].items():
            pts = [(res["nfe_evaluations"][row][str(n)], vals[str(n)]) for n in nfes if vals[str(n)] is not None]
            ax.loglog(
                [p[0] for p in pts], [max(p[1], 1e-300) for p in pts], marker="o", label=f"{row} ({res[lad_key][row]})"
            )
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact KL(output || data) [nats]")


def run(json_path=None, plot_path=None, progress: bool = False, nfe=None) -> dict:
    """Compute, print and optionally save the sampler-accuracy table.

    ``nfe`` (a sequence of model-evaluation counts, e.g. (5, 10, 20, 50)) adds the few-step
    tables of ``compute_nfe_tables`` under the keys "nfe", "nfe_ladders", "nfe_evaluations",
    "nfe_mixture", "nfe_mixture_err", "nfe_mixture_ladders" (and the figure's second row).

    Returns ``{"tables": {"leading": {"eta=0.0": {"10": kl, ...}, ..., "ddpm_large": {...}},
    "sde": {"euler_maruyama": {...}, "predictor_corrector": {...},
    "probability_flow_heun": {...}}}, "config": {...}, "notes": [...]}``; ``json_path``
    writes it as JSON, ``plot_path`` a log-log figure of KL vs steps (PNG).
    """
    t0 = time.perf_counter()
    res = compute_tables(STEPS, progress=progress)
    nfe_res = compute_nfe_tables(tuple(nfe), progress=progress) if nfe else {}
    prec = compute_precision(PRECISION_STEPS, progress=progress)
    seconds = time.perf_counter() - t0
    out = {
        "tables": res["tables"],
        "config": {
            "data": {"mean": DATA_MEAN, "std": DATA_STD},
            "schedule": "linear_schedule(1000)",
            "spacing": "leading",
            "steps": list(STEPS),
            "sde": "VPSDE(beta_min=0.1, beta_max=20, N=1000)",
            "sde_eps": SDE_EPS,
            "snr": SNR,
            "units": "nats",
            "method": "exact (moment propagation through linear-Gaussian chains)",
            "precision": {
                "loops": list(PRECISION_LOOPS),
                "dtypes": list(PRECISION_DTYPES),
                "steps": list(PRECISION_STEPS),
                "draws": PRECISION_N,
                "seed": PRECISION_SEED,
                "method": "moment-matched Gaussian KL, moments estimated against the float64 loop on the same draws",
            },
        },
        "sde_floor": res["sde_floor"],
        **prec,
        "notes": [
            "predictor_corrector is exact: score_sde's batch-mean corrector step in the large-batch limit",
            "a per-sample corrector step gives an output with KL = +inf in 1-D (tails ~ 1/r)",
            "precision: the model output and x_T rounded to the dtype, the loop state float32; "
            "precision_se holds each cell's standard error",
        ],
        "seconds": seconds,
    }
    if nfe:
        out.update({k: v for k, v in nfe_res.items() if not k.endswith("_all")})
        out["config"]["nfe"] = list(nfe)
        out["config"]["nfe_ladders_tried"] = {k: nfe_res[k] for k in ("nfe_all", "nfe_mixture_all")}
        out["config"]["mixture"] = dict(MIXTURE)
    print(_format(out, STEPS, seconds) + (_format_nfe(out, nfe) if nfe else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    if plot_path:
        _plot(out, STEPS, plot_path, nfe)
    return out


def _parse_nfe(text: str):
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--nfe must be a comma-separated list of integers >= 2, e.g. 5,10,20,50; got {text!r}"
        ) from None
    if not vals or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"--nfe must be a comma-separated list of integers >= 2; got {text!r}")
    return vals


def main(argv=None) -> int:
    """``diffmath verify [--json PATH] [--plot PATH] [--nfe [5,10,20,50]] [--progress]``."""
    p = argparse.ArgumentParser(prog="diffmath verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", default=None, help="write the table as JSON")
    p.add_argument("--plot", metavar="PATH", default=None, help="write KL vs steps (log-log) as PNG")
    p.add_argument(
        "--nfe",
        metavar="N,N,...",
        nargs="?",
        const=NFES,
        default=None,
        type=_parse_nfe,
        help="add the few-step solver tables at these numbers of model evaluations (default 5,10,20,50)",
    )
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    args = p.parse_args(argv)
    kw = {"nfe": args.nfe} if args.nfe else {}
    run(json_path=args.json, plot_path=args.plot, progress=args.progress, **kw)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
