"""Which --sigmas ladder `diffmath sample` uses by default (docs/samplers.md, "Which ladder by default").

For each schedule (T = 1000) and number of steps, the exact KL(output || data) in nats of a
sigma-space solver driven by the exact denoiser, started as `diffmath sample` starts it
(x_T sqrt(1 + sigma_0^2), x_T ~ N(0, I)), on each ladder of ``diffmath.sample.solver_ladder``:
Gaussian data N(0.5, 0.1^2) (``diffmath verify``'s) and N([0.5, -0.3], diag(0.04, 0.25)) exactly
(``GaussianData.exact_solver_output``), and ``verify.MIXTURE`` by the change of variables
(``judge.mixture_kl``; "fold" where the map is not monotone).

    python benchmarks/default_ladder.py [--solver dpmpp_2m] [--steps 10,20]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from diffmath.judge import mixture_kl
from diffmath.oracle import GaussianData, GaussianMixture
from diffmath.sample import LADDERS, solver_ladder
from diffmath.schedules import named_schedule
from diffmath.verify import MIXTURE, MIXTURE_RTOL, MIXTURE_TOL

SCHEDULES = ("linear", "cosine", "scaled_linear", "sigmoid")
GAUSS_1D = GaussianData([0.5], [[0.01]])
GAUSS_2D = GaussianData([0.5, -0.3], np.diag([0.04, 0.25]))
MIX = GaussianMixture(
    list(MIXTURE["weights"]), [[m] for m in MIXTURE["means"]], [[[MIXTURE["std"] ** 2]]] * len(MIXTURE["weights"])
)


class _Run:
    """What ``solver_ladder`` reads of a loaded run: its schedule."""

    def __init__(self, schedule):
        self.schedule = schedule


def cell(solver: str, sigmas) -> tuple:
    start = math.sqrt(1.0 + float(sigmas[0]) ** 2)
    kl = [d.exact_solver_output(solver, sigmas, start=start).kl(d) for d in (GAUSS_1D, GAUSS_2D)]
    try:
        kl.append(mixture_kl(MIX, solver, sigmas, start=start, tol=MIXTURE_TOL, rtol=MIXTURE_RTOL).kl)
    except ValueError as e:  # a folded map
        if "not increasing" not in str(e):
            raise
        kl.append(None)
    return tuple(kl)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--steps", default="10,20")
    a = p.parse_args(argv)
    print(f"| schedule | steps | {' | '.join(LADDERS)} |")
    print("|---|---:|" + "---|" * len(LADDERS))
    for name in SCHEDULES:
        run = _Run(named_schedule(name, 1000))
        for n in (int(v) for v in a.steps.split(",")):
            cells = [cell(a.solver, solver_ladder(run, n, lad)) for lad in LADDERS]
            txt = [" / ".join("fold" if v is None else f"{v:.3g}" for v in c) for c in cells]
            print(f"| {name}(1000) | {n} | " + " | ".join(txt) + " |")


if __name__ == "__main__":
    main()
