"""50-digit mpmath references for the schedule tables (shared by the schedule tests).

Written directly from the definitions (products, ratios, square roots, logs), independently
of the cancellation-free forms in diffmath.schedules.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_snr",
)


def reference_tables(betas, dps: int = 50) -> dict[str, list]:
    """Every Schedule table from the exact float64 betas, in ``dps``-digit arithmetic.
    Infinite values are returned as mpmath infinities."""
    with mp.workdps(dps):
        b = [mp.mpf(float(x)) for x in betas]
        T = len(b)
        one = mp.mpf(1)
        abar = []
        p = one
        for x in b:
            p = p * (one - x)
            abar.append(p)
        prev = [one] + abar[:-1]

        def log(x):
            return mp.log(x) if x > 0 else -mp.inf

        def inv_sqrt(x):
            return 1 / mp.sqrt(x) if x > 0 else mp.inf

        out = {
            "betas": b,
            "alphas": [one - x for x in b],
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": [mp.sqrt(a) for a in abar],
            "sqrt_one_minus_alphas_cumprod": [mp.sqrt(one - a) for a in abar],
            "log_one_minus_alphas_cumprod": [mp.log1p(-a) if a < 1 else -mp.inf for a in abar],
            "sqrt_recip_alphas_cumprod": [inv_sqrt(a) for a in abar],
            "sqrt_recipm1_alphas_cumprod": [mp.sqrt(1 / a - 1) if a > 0 else mp.inf for a in abar],
            "posterior_variance": [b[i] * (one - prev[i]) / (one - abar[i]) for i in range(T)],
            "posterior_mean_coef1": [b[i] * mp.sqrt(prev[i]) / (one - abar[i]) for i in range(T)],
            "posterior_mean_coef2": [(one - prev[i]) * mp.sqrt(one - b[i]) / (one - abar[i]) for i in range(T)],
            "log_snr": [log(a) - mp.log1p(-a) if a > 0 else -mp.inf for a in abar],
        }
        pv = out["posterior_variance"]
        out["posterior_log_variance_clipped"] = [log(pv[1])] + [log(v) for v in pv[1:]] if T > 1 else [log(b[0])]
        return out


def max_rel_error(ours: np.ndarray, ref: list) -> float:
    """max_i |ours_i - ref_i| / |ref_i| evaluated in high precision; infinities and zeros of
    the reference must be matched exactly (else the error is inf). A reference beyond the
    float64 range must come out as +-inf; one below the smallest normal (2.2e-308) is measured
    relative to the smallest normal instead, |ours - ref| / 2.2e-308 (subnormals carry fewer
    digits: one subnormal ulp, 4.9e-324, counts 2.2e-16)."""
    worst = mp.mpf(0)
    tiny = mp.mpf(2.2250738585072014e-308)
    with mp.workdps(50):
        for o, r in zip(np.asarray(ours, dtype=np.float64).tolist(), ref):
            if mp.isinf(r) or r == 0 or mp.isinf(mp.mpf(float(r))):
                if not (o == float(r)):
                    return float("inf")
                continue
            if abs(r) < tiny:
                e = abs(mp.mpf(o) - r) / tiny
                if e > worst:
                    worst = e
                continue
            if not np.isfinite(o):
                return float("inf")
            e = abs(mp.mpf(o) - r) / abs(r)
            if e > worst:
                worst = e
    return float(worst)
