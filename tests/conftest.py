import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Before any test module imports diffmath.kernels (and with it triton): without a GPU the Triton
# path runs in the interpreter, and TRITON_INTERPRET must be set before triton is first imported.
import tests.kernels._kernel_env  # noqa: E402,F401

# "ci" is the default: enough examples to span the corners, no per-example deadline (the
# CPU is shared), derandomized so CI is reproducible. DIFFMATH_HYPOTHESIS=thorough runs 10x more,
# with fresh random examples each run.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("DIFFMATH_HYPOTHESIS", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)
