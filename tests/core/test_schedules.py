"""Schedules: every table against a 50-digit mpmath evaluation of its definition.

Precision bar (docs/design.md, "Precision"): relative error <= 1e-13 for T <= 1000 and <= 1e-12
for T <= 10,000, betas
from 1e-10 to 0.999 and exactly 1, plus what the libm itself may cost: every table derives
from log abar = sum_j log1p(-beta_j), and each log1p is only within 4 ulp of exact (the
tolerance policy in docs/numerics.md), an error the summation cannot remove. That allowance,
4 ulp x sum_j |log(1 - beta_j)|, is below 2e-14 for every named schedule and matters only in
deep tails (abar < e^-100); there ``test_deep_tail_sum_is_exact_given_its_logs`` holds the
summation itself to 1e-13. log_snr crosses zero where abar = 1/2; there its relative error is
ill-conditioned (d log_snr / d log abar = 1/(1 - abar)), so it is held to the same relative
bound plus an absolute floor of 1e-15.
"""

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import diffmath as dm
from diffmath.schedules import Schedule, log1mexp
from tests._tables import refusals
from tests.reference._mpref import TABLES, max_rel_error, reference_tables

# A libm call (numpy, scipy, torch) is within 4 ulp of exact whatever the CPU's vector unit
# (docs/numerics.md, "Tolerances"); one ulp is at most 2^-52 relative.
ULP = 2.0**-52
LIBM = 4 * ULP


def _bound(T):
    return 1e-13 if T <= 1000 else 1e-12


def _libm_allowance(betas) -> float:
    """4 ulp of each log(1 - beta_j) that log abar sums: the libm's own error, relative in abar."""
    with np.errstate(divide="ignore"):
        la = np.abs(np.log1p(-np.asarray(betas, dtype=np.float64)))
    return LIBM * float(la[np.isfinite(la)].sum())


def assert_tables_match_mpmath(s: Schedule):
    ref = reference_tables(s.betas)
    tol = _bound(s.num_timesteps) + _libm_allowance(s.betas)
    for name in TABLES:
        ours = getattr(s, name)
        assert ours.dtype == np.float64, name
        assert not np.isnan(ours).any(), name
        if name == "log_snr":
            with mp.workdps(50):
                for o, r in zip(ours.tolist(), ref[name]):
                    if mp.isinf(r):
                        assert o == float(r)
                    else:
                        assert abs(mp.mpf(o) - r) <= tol * abs(r) + 1e-15, (o, r)
            continue
        err = max_rel_error(ours, ref[name])
        assert err <= tol, f"{name}: max relative error {err:.3e} > {tol:.0e}"


betas_strategy = st.one_of(
    st.floats(1e-10, 1e-6),
    st.floats(1e-6, 1e-2),
    st.floats(1e-2, 0.5),
    st.floats(0.5, 0.999),
)


@given(T=st.integers(1, 300), lo=betas_strategy, hi=betas_strategy, geometric=st.booleans())
def test_tables_match_mpmath_random(T, lo, hi, geometric):
    lo, hi = min(lo, hi), max(lo, hi)
    betas = np.geomspace(lo, hi, T) if geometric else np.linspace(lo, hi, T)
    assert_tables_match_mpmath(Schedule.from_betas(betas))


@pytest.mark.parametrize(
    "make",
    [
        lambda: dm.linear_schedule(1000),
        lambda: dm.cosine_schedule(1000),
        lambda: dm.scaled_linear_schedule(1000),
        lambda: dm.sigmoid_schedule(1000),
        lambda: dm.named_schedule("linear", 50),
        lambda: Schedule.from_betas(np.full(1000, 1e-10)),
        lambda: Schedule.from_betas(np.full(60, 0.999)),
        lambda: Schedule.from_betas(np.geomspace(1e-10, 0.999, 1000)),
        lambda: Schedule.from_betas([0.3]),
        lambda: Schedule.from_betas([1e-10]),
        lambda: Schedule.from_betas([1.0]),
        lambda: dm.rescale_zero_terminal_snr(dm.scaled_linear_schedule(1000)),
        # abar run down to e^-553 and e^-740 by constant betas: every log(1 - beta) rounds the
        # same way and log abar is a sum of ~700, so rounding log abar to float64 cost
        # 1.04e-13 and 1.15e-13 here (over the bar) until it was kept as a double-double; the
        # libm allowance covers these now, test_deep_tail_sum_is_exact_given_its_logs the sum.
        lambda: Schedule.from_betas(np.full(266, 0.875)),
        lambda: Schedule.from_betas(np.full(734, 0.6346235701681713)),
    ],
    ids=[
        "linear",
        "cosine",
        "scaled_linear",
        "sigmoid",
        "named_linear_50",
        "tiny",
        "near1",
        "geom",
        "T1",
        "T1tiny",
        "T1one",
        "zero_snr",
        "deep_tail_0.875",
        "deep_tail_0.635",
    ],
)
def test_named_tables_match_mpmath(make):
    assert_tables_match_mpmath(make())


@pytest.mark.parametrize("beta,T", [(0.875, 266), (0.6346235701681713, 734), (0.999, 60)])
def test_deep_tail_sum_is_exact_given_its_logs(beta, T):
    # Constant betas run abar down to e^-553 .. e^-740: every log1p(-beta) carries the same libm
    # error, T times over, which no summation removes (the allowance above). What the
    # implementation adds on top is held against exp of the exact (50-digit) sum of the float64
    # logs it was given: the compensated sum kept as a double-double leaves only exp's error
    # (4 ulp; measured 1.1e-16 to 2.5e-16), where the sum rounded to float64 costs
    # ulp(|log abar|)/2 = 5.6e-14 and np.cumsum 1.2e-12.
    s = Schedule.from_betas(np.full(T, beta))
    logs = np.log1p(-s.betas)  # the values from_betas sums (same array, same libm path)
    with mp.workdps(50):
        ref = [mp.exp(mp.fsum([mp.mpf(v) for v in logs[: t + 1].tolist()])) for t in range(T)]
    assert max_rel_error(s.alphas_cumprod, ref) <= 2 * LIBM
    assert max_rel_error(s.sqrt_recip_alphas_cumprod, [1 / mp.sqrt(r) for r in ref]) <= 2 * LIBM


@pytest.mark.parametrize(
    "make",
    [
        lambda: dm.cosine_schedule(10_000),
        lambda: dm.linear_schedule(10_000, 1e-6, 0.01),
        lambda: Schedule.from_betas(np.geomspace(1e-10, 0.999, 10_000)),
    ],
    ids=["cosine", "linear", "geom"],
)
def test_tables_match_mpmath_T10000(make):
    assert_tables_match_mpmath(make())


def test_naive_forms_miss_the_bar():
    # The bar is meaningful: 1 - cumprod and the cosine's 1 - f(t+1)/f(t) miss it.
    s = dm.linear_schedule(1000, 1e-10, 1e-4)
    ref = reference_tables(s.betas)
    naive = np.log(1 - np.cumprod(1 - s.betas))
    assert max_rel_error(naive, ref["log_one_minus_alphas_cumprod"]) > 1e-10
    assert max_rel_error(s.log_one_minus_alphas_cumprod, ref["log_one_minus_alphas_cumprod"]) <= 1e-13

    T, sc = 1000, 0.008
    f = lambda u: np.cos((u + sc) / (1 + sc) * np.pi / 2) ** 2
    i = np.arange(T)
    naive_betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    with mp.workdps(50):
        fm = lambda u: mp.cos((u + mp.mpf(sc)) / (1 + mp.mpf(sc)) * mp.pi / 2) ** 2
        ref_b = [min(1 - fm(mp.mpf(k + 1) / T) / fm(mp.mpf(k) / T), mp.mpf(0.999)) for k in range(T)]
    assert max_rel_error(naive_betas, ref_b) > 1e-13
    assert max_rel_error(dm.cosine_schedule(T).betas, ref_b) <= 1e-13


@given(T=st.integers(1, 2000), s=st.floats(0.0, 0.1))
@settings(max_examples=15)
def test_cosine_betas_match_mpmath(T, s):
    ours = dm.cosine_schedule(T, s=s).betas
    with mp.workdps(50):
        sm = mp.mpf(s)
        fm = lambda u: mp.cos((u + sm) / (1 + sm) * mp.pi / 2) ** 2
        ref = [min(1 - fm(mp.mpf(k + 1) / T) / fm(mp.mpf(k) / T), mp.mpf(0.999)) for k in range(T)]
    assert max_rel_error(ours, ref) <= _bound(T)


def test_linear_and_scaled_linear_definitions():
    # exact by construction, so held to 1e-15: linspace is + and * only, and sqrt is correctly
    # rounded by IEEE 754 on every CPU (no libm approximation)
    assert_allclose(dm.linear_schedule(7, 0.1, 0.4).betas, [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4], rtol=1e-15)
    b = dm.scaled_linear_schedule(3, 0.01, 0.09).betas
    assert_allclose(b, [0.01, 0.04, 0.09], rtol=1e-15)
    s = dm.named_schedule("linear", 250)
    assert_allclose(s.betas[[0, -1]], [4e-4, 0.08], rtol=1e-15)  # 1000/T scaling
    assert dm.named_schedule("cosine", 100).betas.tolist() == dm.cosine_schedule(100).betas.tolist()


def test_sigmoid_schedule_matches_chen_2023():
    # Chen (2023), Alg. 1: gamma(u) = (v_end - sigmoid((u(end-start)+start)/tau)) / (v_end - v_start)
    T, start, end, tau = 500, -3.0, 3.0, 0.7
    sig = lambda z: 1 / (1 + mp.exp(-z))
    with mp.workdps(50):
        g = lambda u: (
            (sig(mp.mpf(end) / tau) - sig((u * (end - start) + start) / mp.mpf(tau)))
            / (sig(mp.mpf(end) / tau) - sig(mp.mpf(start) / tau))
        )
        ref = [min(1 - g(mp.mpf(k + 1) / T) / g(mp.mpf(k) / T), mp.mpf(0.999)) for k in range(T)]
    ours = dm.sigmoid_schedule(T, start, end, tau).betas
    # through betas_for_alpha_bar: relative precision ~eps/beta (documented), so 1e-9 here
    assert max_rel_error(ours, ref) < 1e-9
    assert ours[-1] == 0.999
    assert dm.sigmoid_schedule(T, start, end, tau).alphas_cumprod[0] == pytest.approx(float(g(mp.mpf(1) / T)), rel=1e-9)


def test_betas_for_alpha_bar_calls_with_float64_and_returns_betas():
    seen = {}

    def abar(u):
        seen["dtype"] = u.dtype
        return np.exp(-3 * u)

    b = dm.betas_for_alpha_bar(abar, 10)
    assert seen["dtype"] == np.float64 and b.dtype == np.float64 and b.shape == (10,)
    assert_allclose(b, -np.expm1(-0.3) * np.ones(10), rtol=1e-13)
    assert dm.betas_for_alpha_bar(lambda u: 1 - u, 4, max_beta=0.9)[-1] == 0.9


def test_log1mexp_matches_mpmath():
    ys = -np.geomspace(1e-300, 700, 2000)
    ours = log1mexp(ys)
    with mp.workdps(400):  # enough digits that 1 - exp(-700) is not rounded to 1
        ref = [mp.log(1 - mp.exp(mp.mpf(y))) for y in ys.tolist()]
    # two libm calls of 4 ulp each: log1p(-exp(y)) passes exp's relative error through (x2),
    # log(-expm1(y)) turns expm1's into an absolute error of a result of magnitude >= log 2
    # (x 1/log 2); 3.5 x 4 ulp + rounding covers both (measured: 4e-16 on AVX-512, AVX2 and SSE)
    assert max_rel_error(ours, ref) < 3.5 * LIBM + ULP


# ----------------------------------------------------------------------------- zero terminal SNR
def test_zero_terminal_snr_edge_case_tables():
    s = Schedule.from_betas([0.1, 0.5, 1.0])
    assert s.alphas_cumprod[-1] == 0 and s.log_snr[-1] == -np.inf
    assert s.sqrt_recip_alphas_cumprod[-1] == np.inf and s.sqrt_recipm1_alphas_cumprod[-1] == np.inf
    assert s.log_one_minus_alphas_cumprod[-1] == 0.0
    assert s.posterior_mean_coef2[-1] == 0.0
    for name in TABLES:
        assert not np.isnan(getattr(s, name)).any(), name
    # beta = 1 in the middle: everything after has abar = 0, still no NaN
    s2 = Schedule.from_betas([0.1, 1.0, 0.2, 0.3])
    assert_array_equal(s2.alphas_cumprod[1:], 0.0)
    assert_tables_match_mpmath(s2)


@given(T=st.integers(2, 400), lo=st.floats(1e-6, 1e-2), hi=st.floats(1e-2, 0.05))
@settings(max_examples=15)
def test_rescale_zero_terminal_snr_matches_lin_et_al(T, lo, hi):
    # Lin et al. (2024), Alg. 1, evaluated naively in 50 digits.
    base = dm.linear_schedule(T, lo, hi)
    z = dm.rescale_zero_terminal_snr(base)
    with mp.workdps(50):
        abar = []
        p = mp.mpf(1)
        for b in base.betas.tolist():
            p *= 1 - mp.mpf(b)
            abar.append(p)
        sq = [mp.sqrt(a) for a in abar]
        s0, sT = sq[0], sq[-1]
        sq = [(x - sT) * s0 / (s0 - sT) for x in sq]
        ab = [x**2 for x in sq]
        ref = [1 - ab[0]] + [1 - ab[i] / ab[i - 1] for i in range(1, T)]
    assert max_rel_error(z.betas, ref) < 1e-12
    assert z.betas[-1] == 1.0 and z.alphas_cumprod[-1] == 0.0
    assert z.betas[0] == base.betas[0]


def test_rescale_is_identity_on_zero_snr_schedules():
    s = Schedule.from_betas([0.1, 0.2, 1.0])
    # beta' = (1 - r)(1 + r), 1 - r = -expm1(log1p(-beta)/2): two libm calls (4 ulp each), both
    # well conditioned here, and three roundings
    assert_allclose(dm.rescale_zero_terminal_snr(s).betas, s.betas, rtol=3 * LIBM)


# ----------------------------------------------------------------------------- respacing
@given(T=st.integers(2, 1000), data=st.data())
@settings(max_examples=25)
def test_respace_keeps_alphas_cumprod(T, data):
    base = dm.cosine_schedule(T)
    k = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=min(T, 50), unique=True))
    kept = np.sort(np.array(k))
    r = base.respace(kept)
    assert r.num_timesteps == kept.size
    assert_array_equal(r.timestep_map, kept)
    # abar' is rebuilt from the stored float64 betas; a beta' near 1 carries absolute error
    # ~eps, i.e. relative error eps/alpha' in alpha' -- that conditioning is the allowance.
    cond = 1e-13 + np.cumsum(2.3e-16 * r.betas / r.alphas)
    rel = np.abs(r.alphas_cumprod - base.alphas_cumprod[kept]) / base.alphas_cumprod[kept]
    assert np.all(rel <= cond), (rel, cond)
    # beta'_j = 1 - abar[k_j]/abar[k_{j-1}] in 50 digits
    ref = reference_tables(base.betas)["alphas_cumprod"]
    with mp.workdps(50):
        prev = mp.mpf(1)
        rb = []
        for j in kept.tolist():
            rb.append(1 - ref[j] / prev)
            prev = ref[j]
    assert max_rel_error(r.betas, rb) <= 1e-13


def test_respace_of_respace_composes_timestep_map():
    base = dm.linear_schedule(1000)
    r1 = base.respace(np.arange(0, 1000, 10))
    r2 = r1.respace([0, 5, 99])
    assert_array_equal(r2.timestep_map, [0, 50, 990])
    # r1's betas near 1 carry relative error eps/alpha in alpha (see above): 1e-11 here
    assert_allclose(r2.alphas_cumprod, base.alphas_cumprod[[0, 50, 990]], rtol=1e-11)


# ----------------------------------------------------------------------------- timesteps
def test_timesteps_match_diffusers_formulas():
    # diffusers (steps_offset = 0): leading = arange(S) * (T // S); trailing = round(arange(T, 0, -T/S)) - 1;
    # linspace = round(linspace(0, T - 1, S)); all returned descending.
    for T, S in [(1000, 50), (1000, 7), (10, 10), (1, 1), (1000, 1), (999, 333), (1000, 3)]:
        lead = dm.timesteps(T, S, "leading")
        assert_array_equal(lead, (np.arange(S) * (T // S))[::-1])
        trail = dm.timesteps(T, S, "trailing")
        expect = np.round(np.arange(T, 0, -T / S)).astype(np.int64)[:S] - 1
        assert_array_equal(trail, expect)
        lin = dm.timesteps(T, S, "linspace")
        assert_array_equal(lin, np.round(np.linspace(0, T - 1, S)).astype(np.int64)[::-1])
        for ts in (lead, trail, lin):
            assert ts.shape == (S,) and np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() < T


def test_timesteps_are_diffusers_own():
    # Every (T, S, spacing) for T in {7, 10, 999, 1000} against diffusers itself (steps_offset = 0),
    # DDIM's and DDPM's set_timesteps. The one deviation: where the float step T/S makes
    # diffusers' arange(T, 0, -T/S) yield S + 1 values (T = 999, S = 13), diffusers returns
    # S + 1 timesteps ending in -1 (not an index); the first S agree and -1 is dropped here.
    from diffusers.schedulers import DDIMScheduler, DDPMScheduler  # lazily: a heavy import

    extra = []
    for T in (7, 10, 999, 1000):
        for cls in (DDIMScheduler, DDPMScheduler):
            for spacing in ("leading", "trailing", "linspace"):
                sched = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
                for S in range(1, T + 1):
                    sched.set_timesteps(S)
                    ref = sched.timesteps.numpy()
                    ours = dm.timesteps(T, S, spacing)
                    assert ours.dtype == np.int64 and ours.shape == (S,)
                    if ref.shape == (S + 1,) and ref[-1] == -1:
                        extra.append((T, S, spacing))
                        ref = ref[:S]
                    assert_array_equal(ours, ref, err_msg=f"{cls.__name__} T={T} S={S} {spacing}")
    # the deviation occurs, for trailing only (one check that the comparison above was exercised)
    assert (999, 13, "trailing") in extra and {sp for _, _, sp in extra} == {"trailing"}


def test_timesteps_known_values():
    # the case: diffusers gives 498 at index 25 (round half to even of 498.5 + ... - 1)
    assert dm.timesteps(999, 50, "trailing")[25] == 498
    assert dm.timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert dm.timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert dm.timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_from_betas_leaves_the_callers_arrays_writable():
    b = np.full(10, 0.1)
    m = np.arange(10, dtype=np.int64)
    s = Schedule.from_betas(b, timestep_map=m)
    b[0] = 0.9  # was: ValueError, assignment destination is read-only
    m[0] = 5
    assert b.flags.writeable and m.flags.writeable
    assert s.betas[0] == 0.1 and s.timestep_map[0] == 0  # the schedule keeps its own copy
    assert not s.betas.flags.writeable and not s.timestep_map.flags.writeable


# ----------------------------------------------------------------------------- bad input
def _assign_first_beta(s):
    s.betas[0] = 0.5


BAD_INPUT = [
    (Schedule.from_betas, dict(betas=np.array([0.1, np.nan])), ValueError, r"betas\[1\] = nan"),
    (Schedule.from_betas, dict(betas=np.array([0.1, np.inf])), ValueError, "finite"),
    (Schedule.from_betas, dict(betas=np.array([0.0, 0.1])), ValueError, r"\(0, 1\].*betas\[0\] = 0.0"),
    (Schedule.from_betas, dict(betas=np.array([0.1, 1.5])), ValueError, r"betas\[1\] = 1.5"),
    (Schedule.from_betas, dict(betas=np.array([-0.1])), ValueError, r"betas\[0\] = -0.1"),
    (Schedule.from_betas, dict(betas=np.array([], dtype=float)), ValueError, "at least one"),
    (Schedule.from_betas, dict(betas=np.array([[0.1, 0.2]])), ValueError, "1-D"),
    (dm.linear_schedule, dict(T=0), ValueError, "T must be >= 1; got T = 0"),
    (dm.cosine_schedule, dict(T=10.5), TypeError, "T must be an integer"),
    (
        dm.named_schedule,
        dict(name="quadratic", T=100),
        ValueError,
        "unknown schedule name 'quadratic'; valid names are linear",
    ),
    (dm.named_schedule, dict(name="linear", T=10), ValueError, "T >= 20"),
    (dm.timesteps, dict(T=100, num_steps=10, spacing="middle"), ValueError, "unknown spacing 'middle'"),
    (
        dm.timesteps,
        dict(T=100, num_steps=101),
        ValueError,
        r"num_steps must lie in \[1, T\] = \[1, 100\]; got num_steps = 101",
    ),
    (dm.timesteps, dict(T=100, num_steps=0), ValueError, "num_steps"),
    (dm.linear_schedule(10).respace, dict(timesteps=[3, 10]), ValueError, r"must lie in \[0, 10\); got 10"),
    (dm.rescale_zero_terminal_snr, dict(schedule=Schedule.from_betas([0.5])), ValueError, "T >= 2"),
    (dm.betas_for_alpha_bar, dict(alpha_bar_fn=lambda u: np.ones_like(u), T=10), ValueError, "strictly decreasing"),
    (dm.cosine_schedule, dict(T=10, max_beta=1.5), ValueError, "max_beta"),
    (dm.sigmoid_schedule, dict(T=10, tau=0.0), ValueError, "tau"),
    # the tables are read-only
    (_assign_first_beta, dict(s=dm.linear_schedule(10)), ValueError, "read-only"),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
