"""NFE vs sample quality of the few-step solvers on a trained digits run (the demo model).

For each (sampler, sigma ladder, NFE) cell this does what

    diffmath sample --run RUN --out OUT/<cell> --sampler S --steps N --sigmas L --num-samples 500 --seed 0
    diffmath evaluate --run RUN --samples OUT/<cell>/samples.npz --out OUT/<cell> --vlb-images 0

do (through the same library calls, in one process so the model and the classifier are loaded
once per cell rather than once per command), then prints a markdown table of NFE vs the mean
classifier confidence, the Frechet distance in the classifier's feature space and the sampling
seconds, and writes it with every cell's numbers to OUT/nfe.json and OUT/nfe.md. A cell
whose folder already holds samples.npz and metrics.json is read, not recomputed.

NFE is the number of network evaluations per sample: one per step for ddim and the one-step or
multistep solvers (euler, dpmpp-2m, dpmpp-*-sde, unipc, lms), ``2 * steps - 1`` for heun (its last
step, to sigma = 0, is an Euler step), so heun runs ``steps = (NFE + 1) // 2`` and the table gives
the NFE it actually used. The test VLB does not depend on the samples and is skipped.

Seconds are wall-clock sampling time on whatever machine runs this; on a shared machine they
are noisy, so read them as ratios within one run of this script, not as absolute speeds.

    python benchmarks/demo_nfe.py --run runs/demo --out /tmp/nfe [--quick] [--trust-unverified]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (sampler, ladder) pairs measured by default; ddim has no ladder (its own timestep spacing). The
# exponential ladder serves every solver best on the demo model (its cosine schedule reaches sigma_max
# ~ 2e4, where rho = 7 spends most Karras steps); dpmpp-2m on Karras shows the default ladder
CELLS = [
    ("ddim", None),
    ("dpmpp-2m", "exponential"),
    ("dpmpp-2m", "karras"),
    ("unipc", "exponential"),
    ("dpmpp-2m", "schedule"),
    ("unipc", "schedule"),
    ("heun", "exponential"),
    ("euler", "exponential"),
    ("dpmpp-3m-sde", "exponential"),
]
NFES = (5, 10, 20)
DDIM_REFERENCE_STEPS = 50


def steps_for(sampler: str, nfe: int) -> tuple[int, int]:
    """(steps, actual NFE) for a target NFE: heun spends 2 evaluations per step but 1 on the last."""
    if sampler in ("heun", "edm"):
        steps = max(1, (nfe + 1) // 2)
        return steps, 2 * steps - 1
    return nfe, nfe


def run_cell(
    run: Path,
    out: Path,
    sampler: str,
    ladder: str | None,
    steps: int,
    *,
    num_samples: int,
    seed: int,
    device: str,
    trust_unverified: bool,
) -> dict:
    from diffmath.pipeline.evaluate import evaluate_run
    from diffmath.pipeline.sample_run import sample_run

    if (out / "metrics.json").is_file() and (out / "samples.npz").is_file():  # measured by an earlier call
        return _row(sampler, ladder, steps, json.loads((out / "metrics.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)
    kw = {"sigmas": ladder} if ladder is not None else {}
    sample_run(
        out,
        run=run,
        sampler=sampler,
        steps=steps,
        num_samples=num_samples,
        seed=seed,
        device=device,
        progress=False,
        trust_unverified=trust_unverified,
        **kw,
    )
    m = evaluate_run(
        run, out / "samples.npz", out, vlb_images=0, device=device, progress=False, trust_unverified=trust_unverified
    )
    return _row(sampler, ladder, steps, m)


def _row(sampler, ladder, steps, m: dict) -> dict:
    return {
        "sampler": sampler,
        "sigmas": ladder,
        "steps": steps,
        "confidence": float(m["mean_confidence"]),
        "fd": float(m["frechet_distance"]["samples"]),
        "fd_floor": float(m["frechet_distance"]["held_out_real (floor)"]),
        "classes_present": int(m["classes_present"]),
        "seconds": float(m["sampler"]["seconds"]),
    }


def table(rows: list[dict], ref: dict | None) -> str:
    lines = [
        "| sampler | sigmas | NFE | confidence | FD | FD / FD(DDIM 50) | sampling s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['fd'] / ref['fd']:.2f}" if ref else "-"
        lines.append(
            f"| {r['sampler']} | {r['sigmas'] or '-'} | {r['nfe']} | {r['confidence']:.3f} | {r['fd']:.3f} | "
            f"{ratio} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a trained digits run (e.g. the one `make demo` writes)")
    p.add_argument("--out", type=Path, required=True, help="folder for one sub-folder per cell, nfe.json and nfe.md")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFE budgets")
    p.add_argument("--samplers", default=None, help="comma-separated subset of the samplers to run")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-unverified", action="store_true", help="load a checkpoint whose SHA-256 is not verified")
    args = p.parse_args(argv)
    nfes = [int(s) for s in args.nfe.split(",") if s]
    keep = set(args.samplers.split(",")) if args.samplers else None
    common = dict(
        num_samples=args.num_samples, seed=args.seed, device=args.device, trust_unverified=args.trust_unverified
    )

    todo = [("ddim", None, DDIM_REFERENCE_STEPS)] if keep is None or "ddim" in keep else []
    todo += [(s, lad, n) for s, lad in CELLS for n in nfes if (keep is None or s in keep) and (s, lad, n) not in todo]
    rows, ref = [], None
    for sampler, ladder, nfe in todo:
        steps, actual = steps_for(sampler, nfe)
        name = f"{sampler}-{ladder or 'ddim'}-{actual}"
        r = run_cell(args.run, args.out / name, sampler, ladder, steps, **common)
        r["nfe"] = actual
        if sampler == "ddim" and steps == DDIM_REFERENCE_STEPS:
            ref = r
        rows.append(r)
        print(f"{name:32s} conf {r['confidence']:.3f}  FD {r['fd']:.3f}  {r['seconds']:.1f} s", flush=True)
    rows.sort(key=lambda r: (r["sampler"] != "ddim", r["sampler"], r["sigmas"] or "", r["nfe"]))
    md = table(rows, ref)
    (args.out / "nfe.md").write_text(md + "\n")
    (args.out / "nfe.json").write_text(json.dumps({"reference": ref, "rows": rows}, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
