"""Hypothesis strategies and input builders for the kernel tests (small tensors: the Triton
interpreter is slow; sizes that are not multiples of the block, and a multi-chunk row)."""

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import diffmath as dm

#: hypothesis settings for kernel tests: the path fixture only sets an environment variable, so
#: sharing it across generated inputs is intended.
KSET = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: the precision we promise (relative norm-wise error against the float64 reference)
TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@st.composite
def shapes(draw):
    """(B, ...) with B in 1..4 and 0-3 trailing dims of awkward sizes; sometimes one row of
    2051 elements (two tiles of 2048)."""
    B = draw(st.integers(1, 4))
    if draw(st.integers(0, 9)) == 0:
        return (B, 2051)
    return (B, *draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))


@st.composite
def schedules(draw):
    kind = draw(st.sampled_from(["linear", "cosine"]))
    T = draw(st.sampled_from([1, 2, 10, 1000]) | st.integers(1, 1000))
    return dm.linear_schedule(T) if kind == "linear" else dm.cosine_schedule(T)


@st.composite
def timestep(draw, T, B):
    """An int (t = 0, T - 1 or any) or an integer tensor of shape (B,)."""
    if draw(st.booleans()):
        return draw(st.sampled_from([0, T - 1]) | st.integers(0, T - 1))
    return torch.tensor(draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B)), dtype=torch.long)


def make(shape, dtype, device, seed, n=1, scale=1.0):
    """``n`` random tensors of ``shape`` in ``dtype`` on ``device`` and their float64 numpy values
    (after rounding to ``dtype``, so the reference sees exactly the kernel's inputs)."""
    rng = np.random.default_rng(seed)
    ts, arrs = [], []
    for _ in range(n):
        t = torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)
        ts.append(t.to(device))
        arrs.append(t.double().numpy())
    return ts, arrs


def tnp(t):
    """t as numpy (int or int64 array)."""
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else t
