"""diffmath's few-step solvers beside diffusers' and k-diffusion's, judged by the same exact oracle.

    python benchmarks/peers.py [--nfe 5,10,20,50] [--json PATH] [--plot PATH] [--quick]

Method. With the exact denoiser of Gaussian data a deterministic sampler is an affine map of
its start, x_T -> A x_T + b; running the *peer's own loop* on the two starts x_T = 0 and
x_T = 1 (1-D, one batch of two rows, float64) identifies (A, b), hence the peer's exact output
N(b, A^2 var_T) and its exact KL to the data (``diffmath.oracle.GaussianData.exact_solver_output``
does this for any solver with k-diffusion's calling convention). On the 1-D mixture of
``diffmath verify`` the same loops are judged by the change of variables
(``diffmath.judge.mixture_kl``, quadrature error <= 1e-7 nats or 1e-8 x KL).

A third table judges the integration alone: KL(output || ``exact_flow_limit``), the distance of
each deterministic solver's exact output to the output its own method converges to on the same
ladder end points (the exact probability flow from the same start, then D at the last level).
KL to the data mixes that error with the problem's own distance to the data (2.97e-5 nats here:
the start N(0, sigma_max^2) and the last step's D(x; sigma_min)), and a cell below that limit is
a cancellation of the two, not a better solver (docs/samplers.md). diffusers' default linspace
ladders stop far above sigma_min (a shorter problem) and are left out of this table.

The model every loop sees is the ideal one. k-diffusion's samplers call ``model(x, sigma)`` = the
exact denoiser D(x; sigma). diffusers' schedulers call an eps-prediction model on the VP input
x_t with a timestep t; the ideal model returns E[eps | x_t] for the noise level sigma(t) of the
timestep it is given (log sigma interpolated between the float64 table entries of
``linear_schedule(1000)``, k-diffusion's and ``diffmath.denoiser``'s rule), which is what a
perfectly trained network would do. For the agreement check (``--check``, and
benchmarks/test_peers.py) the model instead uses the scheduler's own current sigma, so that both
sides run the same algorithm on the same ladder with the same denoiser.

diffusers keeps its tables in float32 and EulerDiscrete / DPMSolverMultistep round the sample to
float32 in every ``step``. For a float64 comparison (and for the mixture judge, which needs a
strictly increasing map) the schedulers run under ``float64_diffusers``, which makes their
``torch.float32`` mean float64; the ladder is the scheduler's own (``set_timesteps``), and
diffmath's solver runs on those same values. As shipped (float32), their outputs differ from the
float64 runs by <= 8e-6 relative (Euler), 4e-7 (DPM-Solver++), measured with this script before
the context existed.

Peers. k-diffusion 0.1.1.post1: ``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``,
``sample_lms``, ``sample_dpmpp_3m_sde`` (eta = 0 and 1), ``sample_dpmpp_2m_sde`` on
``get_sigmas_karras`` (rho = 7) and ``get_sigmas_exponential``. diffusers 0.42.1:
``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``DPMSolverMultistepScheduler``
(dpmsolver++, order 2), ``UniPCMultistepScheduler`` (bh2, order 2), ``LMSDiscreteScheduler``,
each with its default ladder, ``use_karras_sigmas=True`` and ``use_exponential_sigmas=True``.
Install: ``pip install -e ".[bench]"`` brings diffusers; k-diffusion's package imports its
training stack (torchvision, clip, wandb, ...), so install it without those:
``pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline``; this script
loads ``k_diffusion/sampling.py`` by file path (with a stand-in for torchvision if it is absent,
which sampling.py never calls). Neither peer is needed by ``make test``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from diffmath import verify
from diffmath.judge import mixture_kl
from diffmath.oracle import GaussianData, GaussianMixture
from diffmath.samplers import SOLVERS, sigmas_exponential
from diffmath.schedules import linear_schedule

S = linear_schedule(1000)
TABLE = np.asarray(S.sqrt_recipm1_alphas_cumprod, dtype=np.float64)  # sigma_t, increasing in t
SIG_MIN, SIG_MAX = float(TABLE[0]), float(TABLE[-1])
DATA = GaussianData([verify.DATA_MEAN], [[verify.DATA_STD**2]])
MIX = GaussianMixture(
    list(verify.MIXTURE["weights"]),
    [[m] for m in verify.MIXTURE["means"]],
    [[[verify.MIXTURE["std"] ** 2]]] * len(verify.MIXTURE["weights"]),
)


# ----------------------------------------------------------------------------- loading the peers
def load_k_diffusion():
    """k_diffusion.sampling, imported normally if possible, else by file path (module docstring);
    None if k-diffusion is not installed."""
    try:
        import k_diffusion.sampling as kds  # noqa: PLC0415

        return kds
    except Exception:  # its package __init__ pulls the training stack
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    stubs = []
    try:
        import torchvision  # noqa: F401, PLC0415
    except ImportError:  # utils.py imports torchvision.transforms.functional at the top, sampling never uses it
        stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        tr.functional = types.ModuleType("torchvision.transforms.functional")
        tv.transforms = tr
        sys.modules.setdefault("torchvision", tv)
        sys.modules.setdefault("torchvision.transforms", tr)
        sys.modules.setdefault("torchvision.transforms.functional", tr.functional)
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(root)]
    sys.modules["k_diffusion"] = pkg
    for name in ("utils", "sampling"):
        sp = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
        mod = importlib.util.module_from_spec(sp)
        sys.modules[f"k_diffusion.{name}"] = mod
        sp.loader.exec_module(mod)
        setattr(pkg, name, mod)
    for name in stubs:  # other packages (diffusers) must still see that torchvision is absent
        sys.modules.pop(name, None)
    return pkg.sampling


def load_diffusers():
    try:
        import diffusers  # noqa: PLC0415

        return diffusers
    except Exception:
        return None


# ----------------------------------------------------------------------------- k-diffusion
def kd_solver(kds, name: str, **opts):
    """A k-diffusion sampler with diffmath's solver convention (numpy or torch x, numpy ladder)."""
    fn = getattr(kds, f"sample_{name}")
    takes_noise = "noise_sampler" in inspect.signature(fn).parameters

    def run(denoiser, x, sigmas, noise_sampler=None, **kw):
        tor = torch.is_tensor(x)
        xt = x if tor else torch.as_tensor(np.asarray(x, dtype=np.float64))
        sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))

        def model(v, s):
            return denoiser(v, s) if tor else torch.as_tensor(denoiser(v.numpy(), s.numpy()))

        def noise(a, b):
            if noise_sampler is None:
                return torch.zeros_like(xt)
            return torch.as_tensor(noise_sampler(float(a), float(b)))

        extra = dict(opts)
        if takes_noise:
            extra["noise_sampler"] = noise
        out = fn(model, xt, sig, disable=True, **extra)
        return out if tor else out.numpy()

    if takes_noise:
        return run

    def det(denoiser, x, sigmas, **kw):
        return run(denoiser, x, sigmas)

    return det


def kd_ladder(kds, kind: str, n: int) -> np.ndarray:
    f = kds.get_sigmas_karras if kind == "karras" else kds.get_sigmas_exponential
    return (
        f(n, SIG_MIN, SIG_MAX).to(torch.float64).numpy()
        if kind == "exponential"
        else f(n, SIG_MIN, SIG_MAX, rho=7.0).to(torch.float64).numpy()
    )


# ----------------------------------------------------------------------------- diffusers
DIFFUSERS = {
    "EulerDiscreteScheduler": ("euler", {}),
    "HeunDiscreteScheduler": ("heun", {}),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPCMultistepScheduler": ("unipc", {"solver_order": 2, "solver_type": "bh2"}),
    "LMSDiscreteScheduler": ("lms", {}),
}
LADDER_FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
VP_SAMPLE = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")  # sample is x_t (no input scaling)


def sigma_of_t(t) -> np.ndarray:
    """sigma(t): log sigma linear in t between the float64 table entries (integer t: the entry)."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp(np.interp(t, np.arange(TABLE.size, dtype=np.float64), np.log(TABLE)))


class float64_diffusers:
    """Within this context diffusers' scheduler modules see ``torch.float32`` as float64: their
    tables and the per-step ``sample.to(torch.float32)`` of EulerDiscrete and DPMSolverMultistep
    (which would round a float64 loop to float32 at every step) stay float64, so their loops
    can be compared with diffmath's in float64. Nothing else changes."""

    MODULES = (
        "scheduling_euler_discrete",
        "scheduling_heun_discrete",
        "scheduling_dpmsolver_multistep",
        "scheduling_unipc_multistep",
        "scheduling_lms_discrete",
    )

    def __enter__(self):
        proxy = types.ModuleType("torch")
        proxy.__dict__.update(torch.__dict__)
        proxy.float32 = torch.float64
        self.mods = [importlib.import_module(f"diffusers.schedulers.{m}") for m in self.MODULES]
        for m in self.mods:
            m.torch = proxy
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.torch = torch
        return False


def make_scheduler(diffusers, cls_name: str, ladder: str, steps: int):
    """The scheduler on linear_schedule(1000)'s betas, ``set_timesteps(steps)``, sigmas in float64."""
    cls = getattr(diffusers, cls_name)
    cfg = dict(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    cfg.update(DIFFUSERS[cls_name][1])
    cfg.update(LADDER_FLAGS[ladder])
    sch = cls(**cfg)
    sch.set_timesteps(steps)
    sch.sigmas = sch.sigmas.to(torch.float64)
    return sch


def diffusers_run(diffusers, cls_name: str, ladder: str, steps: int, denoiser, x_sigma, model_sigma: str = "timestep"):
    """Run the scheduler's own loop from the sigma-space start ``x_sigma`` (B, 1) (float64
    numpy or torch) with the ideal eps model (module docstring); returns the output like x.
    model_sigma: "timestep" (sigma(t) of the timestep the model gets) or "scheduler" (the
    scheduler's current sigma)."""
    with float64_diffusers():
        return _diffusers_loop(diffusers, cls_name, ladder, steps, denoiser, x_sigma, model_sigma)


def _diffusers_loop(diffusers, cls_name, ladder, steps, denoiser, x_sigma, model_sigma):
    sch = make_scheduler(diffusers, cls_name, ladder, steps)
    tor = torch.is_tensor(x_sigma)
    x = x_sigma.to(torch.float64) if tor else torch.as_tensor(np.asarray(x_sigma, dtype=np.float64))
    smax = float(sch.sigmas[0])
    sample = x / math.sqrt(1.0 + smax * smax) if cls_name in VP_SAMPLE else x.clone()
    for t in sch.timesteps:
        xin = sch.scale_model_input(sample, t)
        if model_sigma == "scheduler":
            sig = float(sch.sigmas[sch.step_index if sch.step_index is not None else 0])
        else:
            sig = float(sigma_of_t(float(t)))
        xs = xin * math.sqrt(1.0 + sig * sig)  # the model's input back in sigma space
        den = denoiser(
            xs if tor else xs.numpy(),
            torch.full((xs.shape[0],), sig, dtype=torch.float64) if tor else np.full(xs.shape[0], sig),
        )
        den = den if torch.is_tensor(den) else torch.as_tensor(den)
        eps = (xs - den) / sig
        sample = sch.step(eps, t, sample).prev_sample
    return sample if tor else sample.numpy()


def diffusers_solver(diffusers, cls_name, ladder, steps, model_sigma="timestep"):
    """The scheduler's loop with diffmath's solver convention (the ladder argument is ignored:
    the scheduler makes its own)."""

    def run(denoiser, x, sigmas, **kw):
        return diffusers_run(diffusers, cls_name, ladder, steps, denoiser, x, model_sigma)

    return run


def diffusers_ladder_and_start(diffusers, cls_name, ladder, steps):
    """(the float64 ladder the scheduler steps over, the std of its start in sigma space)."""
    with float64_diffusers():
        sch = make_scheduler(diffusers, cls_name, ladder, steps)
    sig = sch.sigmas.numpy().astype(np.float64)
    if cls_name == "HeunDiscreteScheduler":  # its sigmas repeat each interior level (2 stages)
        sig = np.concatenate([sig[:1], sig[1:-1:2], sig[-1:]])
    smax = float(sig[0])
    start = math.sqrt(1.0 + smax * smax) if cls_name in VP_SAMPLE else float(sch.init_noise_sigma)
    return sig, start


def diffusers_steps(cls_name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe


# ----------------------------------------------------------------------------- the table
def ours(nfes, judge: str):
    """diffmath's best solver per NFE over its rows and the ladders karras / exponential."""
    out = {}
    for n in nfes:
        best = (math.inf, None)
        for row, solver, opts in verify.NFE_ROWS:
            if judge != "gaussian" and row in verify.STOCHASTIC_ROWS:  # deterministic maps only
                continue
            for lad in verify.LADDERS:
                sig = verify._ladder(lad, verify.nfe_levels(row, n), SIG_MIN, SIG_MAX)
                kl = _judge(SOLVERS[solver], sig, None, judge, **opts)
                if kl is not None and kl < best[0]:
                    best = (kl, f"{row} ({lad})")
        out[str(n)] = best
    return out


def exact_flow_limit(sig, start=None) -> GaussianData:
    """The output every convergent solver of the probability-flow ODE approaches on this ladder's
    end points as its steps go to zero, for the 1-D Gaussian DATA N(m, v): the exact flow from
    x_T ~ N(0, S^2) at sigma_0 (S = ``start``, default sigma_0) down to the last positive level
    sigma_L, then the ladder's last step to 0, which returns D(x; sigma_L) (or x itself when the
    ladder ends above 0). The flow keeps z = (x - m) / sqrt(v + sigma^2) fixed (its solution for
    Gaussian data), and D(x; sigma) = m + v / (v + sigma^2) (x - m), so the output is

        N(m + c mu_z, c^2 var_z),  mu_z = -m / sqrt(v + sigma_0^2),  var_z = S^2 / (v + sigma_0^2),
        c = v / sqrt(v + sigma_L^2)  (ending with D),  c = sqrt(v + sigma_L^2)  (ending at sigma_L).

    KL(output || this) is then the error of the integration alone: the distance to the exact
    solution of the problem the solver solves, whatever that problem's own distance to the data."""
    sig = np.asarray(sig, dtype=np.float64)
    m, v = float(DATA.mean[0]), float(DATA.cov[0, 0])
    S = float(sig[0]) if start is None else float(start)
    s0 = float(sig[0])
    ends_at_zero = sig[-1] == 0
    sL = float(sig[-2] if ends_at_zero else sig[-1])
    mu_z, var_z = -m / math.sqrt(v + s0 * s0), S * S / (v + s0 * s0)
    c = v / math.sqrt(v + sL * sL) if ends_at_zero else math.sqrt(v + sL * sL)
    return GaussianData([m + c * mu_z], [[c * c * var_z]])


def _judge(solver, sig, start, judge: str, **opts):
    """The exact KL of one configuration by ``judge``: "gaussian" (to DATA), "mixture" (to MIX,
    None for a folded map) or "solver_error" (to ``exact_flow_limit`` on the same ladder)."""
    if judge == "solver_error":
        out = DATA.exact_solver_output(solver, sig, start=start, backend="numpy", **opts)
        return out.kl(exact_flow_limit(sig, start))
    if judge == "gaussian":
        return DATA.exact_solver_output(solver, sig, start=start, backend="numpy", **opts).kl(DATA)
    try:
        return mixture_kl(MIX, solver, sig, start=start, rtol=1e-8, max_nodes=1 << 20, **opts).kl
    except ValueError as e:
        if "not increasing" in str(e):
            return None  # a folded map
        raise


def peers(nfes, judge: str, kds, diffusers):
    """{peer config: {str(nfe): kl}} for every peer configuration."""
    rows = {}
    if kds is not None:
        confs = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("lms", {}), ("dpmpp_3m_sde", {"eta": 0.0})]
        if judge == "gaussian":
            confs += [("dpmpp_3m_sde", {"eta": 1.0}), ("dpmpp_2m_sde", {"eta": 1.0})]
        for name, opts in confs:
            for lad in ("karras", "exponential"):
                eta = f" eta={opts['eta']:g}" if opts else ""
                key = f"k-diffusion {name}{eta} ({lad})"
                rows[key] = {}
                for n in nfes:
                    levels = (n + 1) // 2 if name == "heun" else n
                    sig = kd_ladder(kds, lad, levels)
                    rows[key][str(n)] = _judge(kd_solver(kds, name, **opts), sig, None, judge)
    if diffusers is not None:
        for cls_name in DIFFUSERS:
            for lad in LADDER_FLAGS:
                if judge == "solver_error" and lad == "default":
                    continue  # its linspace ladder stops far above sigma_min (0.34 at NFE 10): a shorter problem
                key = f"diffusers {cls_name} ({lad})"
                rows[key] = {}
                for n in nfes:
                    steps = diffusers_steps(cls_name, n)
                    sig, start = diffusers_ladder_and_start(diffusers, cls_name, lad, steps)
                    rows[key][str(n)] = _judge(diffusers_solver(diffusers, cls_name, lad, steps), sig, start, judge)
    return rows


def agreement(kds, diffusers, nfes=(5, 10, 20, 50)):
    """max relative difference of the output mean and variance (Gaussian data, float64) between
    each peer and diffmath's same algorithm on the same ladder with the same denoiser."""
    res = {}

    def rel(a: GaussianData, b: GaussianData):
        dm = abs(float(a.mean[0]) - float(b.mean[0])) / abs(float(b.mean[0]))
        dv = abs(float(a.cov[0, 0]) - float(b.cov[0, 0])) / float(b.cov[0, 0])
        return max(dm, dv)

    if kds is not None:
        for name in ("euler", "heun", "dpmpp_2m", "lms"):
            for lad in ("karras", "exponential"):
                worst = 0.0
                for n in nfes:
                    sig = kd_ladder(kds, lad, (n + 1) // 2 if name == "heun" else n)
                    a = DATA.exact_solver_output(kd_solver(kds, name), sig)
                    b = DATA.exact_solver_output(name, sig)
                    worst = max(worst, rel(a, b))
                res[f"k-diffusion {name} ({lad})"] = worst
        for eta in (0.0, 1.0):  # k-diffusion's 3M is diffmath's third_order="damped"
            for lad in ("karras", "exponential"):
                worst = 0.0
                for n in nfes:
                    sig = kd_ladder(kds, lad, n)
                    a = DATA.exact_solver_output(kd_solver(kds, "dpmpp_3m_sde", eta=eta), sig)
                    b = DATA.exact_solver_output("dpmpp_3m_sde", sig, eta=eta, third_order="damped")
                    worst = max(worst, rel(a, b))
                res[f"k-diffusion dpmpp_3m_sde eta={eta:g} ({lad}), damped"] = worst
    if diffusers is not None:
        for cls_name, (name, _) in DIFFUSERS.items():
            for lad in LADDER_FLAGS:
                worst = 0.0
                for n in nfes:
                    steps = diffusers_steps(cls_name, n)
                    sig, start = diffusers_ladder_and_start(diffusers, cls_name, lad, steps)
                    a = DATA.exact_solver_output(
                        diffusers_solver(diffusers, cls_name, lad, steps, "scheduler"), sig, start=start
                    )
                    b = DATA.exact_solver_output(name, sig, start=start)
                    worst = max(worst, rel(a, b))
                res[f"diffusers {cls_name} ({lad})"] = worst
    return res


def _fmt(v) -> str:
    return "fold" if v is None else f"{v:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--check", action="store_true", help="also print the same-algorithm agreement")
    args = p.parse_args(argv)
    nfes = tuple(int(v) for v in args.nfe.split(","))
    kds, dif = load_k_diffusion(), load_diffusers()
    print(f"k-diffusion: {'loaded' if kds else 'absent'}; diffusers: {dif.__version__ if dif else 'absent'}")
    t0 = time.perf_counter()
    result = {"nfe": list(nfes)}
    for key, judge in (("gaussian", "gaussian"), ("mixture", "mixture"), ("gaussian_solver_error", "solver_error")):
        mine = ours(nfes, judge)
        theirs = peers(nfes, judge, kds, dif)
        best_peer = {}
        for c in map(str, nfes):
            cands = [(v[c], k) for k, v in theirs.items() if v[c] is not None]
            best_peer[c] = min(cands) if cands else (None, None)
        result[key] = {"diffmath_best": mine, "peers": theirs, "best_peer": best_peer}
        title = {
            "gaussian": "Gaussian data N(0.5, 0.1^2): exact KL(output || data)",
            "mixture": f"1-D mixture {verify.MIXTURE}: exact KL(output || data)",
            "gaussian_solver_error": "Gaussian data, deterministic solvers: exact KL(output || exact_flow_limit), "
            "the integration error alone",
        }[key]
        print(f"\n{title} in nats by NFE")
        print(f"{'':<58}" + "".join(f"{c:>11}" for c in map(str, nfes)))
        for k, v in theirs.items():
            print(f"{k:<58}" + "".join(f"{_fmt(v[c]):>11}" for c in map(str, nfes)))
        print(f"{'best peer':<58}" + "".join(f"{_fmt(best_peer[c][0]):>11}" for c in map(str, nfes)))
        print(f"{'diffmath best':<58}" + "".join(f"{_fmt(mine[c][0]):>11}" for c in map(str, nfes)))
        for c in map(str, nfes):
            print(
                f"  NFE {c}: diffmath {mine[c][1]} {_fmt(mine[c][0])}; best peer {best_peer[c][1]} "
                f"{_fmt(best_peer[c][0])}"
            )
    if args.check:
        result["agreement"] = agreement(kds, dif, nfes)
        print("\nsame algorithm, same ladder, same denoiser: max relative difference of output mean / variance")
        for k, v in result["agreement"].items():
            print(f"  {k:<58}{v:.2e}")
    result["seconds"] = time.perf_counter() - t0
    print(f"\ncomputed in {result['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        _plot(result, nfes, args.plot)
    return 0


def _plot(result, nfes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("gaussian", "mixture", "gaussian_solver_error") if k in result]
    titles = {
        "gaussian": "Gaussian data: KL(output || data)",
        "mixture": "1-D mixture: KL(output || data)",
        "gaussian_solver_error": "Gaussian data: KL(output || exact flow)",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.6))
    for ax, key in zip(np.atleast_1d(axes), keys):
        cols = list(map(str, nfes))
        mine = result[key]["diffmath_best"]
        ax.loglog(nfes, [mine[c][0] for c in cols], "k-o", lw=2.5, label="diffmath, best solver per NFE")
        groups = {}
        for k, v in result[key]["peers"].items():
            g = k.split(" ")[0]
            groups.setdefault(g, []).append(v)
        for g, rows in groups.items():
            best = [min((r[c] for r in rows if r[c] is not None), default=np.nan) for c in cols]
            ax.loglog(nfes, best, "--s", label=f"{g}, best configuration per NFE")
        if key == "gaussian":  # what every one of these solvers converges to (exact_flow_limit)
            lim = exact_flow_limit(sigmas_exponential(2, SIG_MIN, SIG_MAX)).kl(DATA)
            ax.axhline(lim, color="grey", ls=":", label=f"limit of every solver as NFE grows ({lim:.3g})")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(titles[key])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("exact KL [nats]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
