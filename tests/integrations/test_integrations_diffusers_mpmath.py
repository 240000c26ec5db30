"""The six sigma-space adapters of diffmath.integrations.diffusers against 50-digit mpmath: every
call of a loop (the multistep history included) on the config's exact ladder, float64 within
1e-12 relative (the issue's bar); diffusers' own class on the same float32 inputs within its
float32 error, which checks the reference against a second, independent implementation."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffmath.integrations import diffusers as dm  # noqa: E402
from tests.reference._mpref_sigma import step_errors  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [
    ("EulerDiscreteScheduler", {}, 10),
    ("EulerAncestralDiscreteScheduler", SD, 12),  # same seeded noise for every class
    ("HeunDiscreteScheduler", {}, 8),
    ("LMSDiscreteScheduler", SD, 12),  # 12 levels: interpolated sigmas between table entries
    ("DPMSolverMultistepScheduler", {}, 10),
    ("UniPCMultistepScheduler", {}, 10),
    ("UniPCMultistepScheduler", dict(solver_order=3), 16),
]
# the adapter in float64: every step is a few float64 operations on float64 tables (observed
# <= 2e-15 over these loops); the bar
TOL_ADAPTER = 1e-12
# diffusers in float32 from float32 tables (and, for LMS, scipy quad at epsrel 1e-4): observed
# <= 6e-6 over these loops and the benchmark's
TOL_DIFFUSERS = 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_adapter_float64_loop_matches_mpmath(case):
    kind, config, steps = case
    d32, a64 = step_errors(
        kind,
        config,
        steps,
        shape=(2, 3, 4, 4),
        seed=7,
        classes=((getattr(diffusers, kind), torch.float32), (getattr(dm, kind), torch.float64)),
    )
    assert a64 <= TOL_ADAPTER, (kind, a64)
    assert d32 <= TOL_DIFFUSERS, (kind, d32)
    assert a64 < d32  # the float64 arithmetic is the more accurate one by orders of magnitude
