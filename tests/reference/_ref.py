"""Independent float64 references used across the core tests: abar by a plain product
(not the library's compensated log-sum), and random schedules spanning the corners."""

import numpy as np
from hypothesis import strategies as st

import diffmath as dm


def abar_by_product(betas, t):
    """prod_{j <= t} (1 - beta_j) by direct multiplication (t = -1 gives 1)."""
    return float(np.prod(1.0 - np.asarray(betas[: t + 1], dtype=np.float64)))


@st.composite
def schedules(draw, max_T=10_000, lo_min=1e-6, hi_max=0.999):
    """A linear, cosine or geometric schedule with T in [1, max_T] and betas in the corners."""
    kind = draw(st.sampled_from(["linear", "cosine", "geom"]))
    T = draw(st.integers(1, max_T))
    if kind == "cosine":
        return dm.cosine_schedule(T)
    lo = draw(st.floats(lo_min, 1e-2))
    hi = draw(st.floats(1e-2, hi_max))
    if kind == "linear":
        return dm.linear_schedule(T, lo, hi)
    return dm.Schedule.from_betas(np.geomspace(lo, hi, T))


def linspace_betas(T=(1, 1500), lo=(1e-7, 1e-2), hi=(1e-3, 0.999)):
    """betas = linspace(lo, max(lo, hi), T) (float64), with T, lo and hi drawn from the given
    (min, max) ranges: the random linear schedules of the mpmath sampler-step tests."""
    return st.builds(lambda T, lo, hi: np.linspace(lo, max(lo, hi), T), st.integers(*T), st.floats(*lo), st.floats(*hi))


@st.composite
def schedule_and_t(draw, **kw):
    s = draw(schedules(**kw))
    T = s.num_timesteps
    t = draw(st.one_of(st.just(0), st.just(T - 1), st.integers(0, T - 1)))
    return s, t
