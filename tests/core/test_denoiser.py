"""diffmath.denoiser against independent closed forms: the existing parameterization
conversions (DDPM eq. 15, Salimans & Ho 2022), the oracle's exact denoiser (posterior mean of
Gaussian and mixture data) fed through each model type, the SDEs' own marginal code for the
inverse t(sigma), and the timestep interpolation by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from diffmath.denoiser import Denoiser, preconditioning, sigma_to_t_schedule, sigma_to_t_sde, t_to_sigma_sde
from diffmath.oracle import GaussianData, GaussianMixture
from diffmath.parameterization import eps_from_score, v_from_x0_eps, x0_from_eps, x0_from_v
from diffmath.schedules import cosine_schedule, linear_schedule, timesteps
from diffmath.sde import VESDE, VPSDE, SubVPSDE

S = linear_schedule(1000)
DATA = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.02]])
MIX = GaussianMixture([0.3, 0.7], [[-1.0, 0.2], [0.8, -0.1]], [np.diag([0.05, 0.1]), np.diag([0.2, 0.03])])
SIG_TAB = S.sqrt_recipm1_alphas_cumprod


def _x(rng, B=7, scale=1.0):
    return rng.standard_normal((B, 2)) * scale


# ----------------------------------------------------------------------------- discrete schedule
@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_eps_denoiser_is_x0_from_eps(rng, t):
    """D(x; sigma_t) of an eps-model = DDPM eq. 15 on x_t = sqrt(abar_t) x (parameterization)."""
    W = rng.standard_normal((2, 2))

    def eps_model(xt, tt):
        assert tt.dtype == np.int64 and np.all(tt == t)
        return np.tanh(xt @ W)

    sigma = SIG_TAB[t]
    x = _x(rng, scale=math.sqrt(1 + sigma**2))
    D = Denoiser.from_schedule(eps_model, S)(x, sigma)
    xt = S.sqrt_alphas_cumprod[t] * x
    ref = x0_from_eps(S, xt, t, eps_model(xt, np.full(7, t)))
    # 1/sqrt(1 + sigma^2) vs the table's sqrt(abar): a few ulp, amplified by 1/sqrt(abar) at t = 999
    assert_allclose(D, ref, rtol=1e-12, atol=1e-12 * np.abs(x).max())


@pytest.mark.parametrize("t", [3, 500, 998])
def test_v_x0_score_denoisers_match_parameterization(rng, t):
    """v-, x0- and score-models built from one eps-model give the same D (Salimans & Ho 2022)."""
    W = rng.standard_normal((2, 2))
    sigma = SIG_TAB[t]
    x = _x(rng, scale=math.sqrt(1 + sigma**2))
    xt = S.sqrt_alphas_cumprod[t] * x
    T = np.full(7, t)

    def eps_model(a, tt):
        return np.sin(a @ W)

    def x0_model(a, tt):
        return x0_from_eps(S, a, tt, eps_model(a, tt))

    def v_model(a, tt):
        return v_from_x0_eps(S, tt, x0_model(a, tt), eps_model(a, tt))

    def score_model(a, tt):
        return -eps_model(a, tt) / S.sqrt_one_minus_alphas_cumprod[tt][:, None]

    ref = x0_model(xt, T)
    for pred, model in (("x0", x0_model), ("v", v_model), ("score", score_model)):
        D = Denoiser.from_schedule(model, S, prediction=pred)(x, sigma)
        assert_allclose(D, ref, rtol=1e-11, atol=1e-11 * np.abs(x).max(), err_msg=pred)
    # and the conversions the other way agree with the library's
    assert_allclose(x0_from_v(S, xt, T, v_model(xt, T)), ref, rtol=1e-11, atol=1e-11 * np.abs(x).max())
    assert_allclose(eps_from_score(S, T, score_model(xt, T)), eps_model(xt, T), rtol=1e-12)


@pytest.mark.parametrize("oracle", [DATA, MIX], ids=["gaussian", "mixture"])
def test_schedule_denoiser_of_exact_eps_is_exact_denoiser(rng, oracle):
    """Fed the oracle's exact eps, D is the oracle's posterior mean at every on-table sigma."""
    D = Denoiser.from_schedule(lambda a, tt: oracle.eps(a, tt, S), S)
    for t in (0, 10, 400, 999):
        sigma = SIG_TAB[t]
        x = _x(rng, scale=math.sqrt(1 + sigma**2))
        # different closed forms (Tweedie via the eps of x_t vs the posterior mean in the eigenbasis)
        assert_allclose(D(x, sigma), oracle.denoise(x, sigma), rtol=1e-11, atol=1e-12)


def test_interpolated_timestep_by_hand():
    seen = []

    def model(a, tt):
        seen.append(tt)
        return torch.zeros_like(a) if torch.is_tensor(a) else np.zeros_like(a)

    D = Denoiser.from_schedule(model, S)
    k = 300
    sigma = math.exp(0.5 * (math.log(SIG_TAB[k]) + math.log(SIG_TAB[k + 1])))  # half way in log sigma
    D(np.zeros((3, 2)), sigma)
    assert seen[-1].dtype == np.float64
    assert_allclose(seen[-1], [k + 0.5] * 3, rtol=1e-11)
    # a quarter of the way
    sigma = math.exp(0.75 * math.log(SIG_TAB[k]) + 0.25 * math.log(SIG_TAB[k + 1]))
    assert_allclose(sigma_to_t_schedule(S, sigma), k + 0.25, rtol=1e-11)
    # on the table: integers, also for a float32 sigma of a table entry (torch and numpy)
    D(np.zeros((2, 2), np.float32), np.full(2, SIG_TAB[k], np.float32))
    assert seen[-1].dtype == np.int64 and list(seen[-1]) == [k, k]
    D(torch.zeros(2, 2), torch.tensor([SIG_TAB[7], SIG_TAB[900]], dtype=torch.float32))
    assert seen[-1].dtype == torch.int64 and seen[-1].tolist() == [7, 900]
    # a mixed batch is a float time
    D(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([SIG_TAB[7], sigma], dtype=torch.float64))
    assert seen[-1].dtype == torch.float64
    assert_allclose(seen[-1].numpy(), [7.0, k + 0.25], rtol=1e-11)


def test_respaced_schedule_gets_original_indices():
    sr = S.respace(timesteps(1000, 10, "trailing"))
    seen = []
    D = Denoiser.from_schedule(lambda a, tt: (seen.append(tt), np.zeros_like(a))[1], sr)
    D(np.zeros((1, 2)), sr.sqrt_recipm1_alphas_cumprod[3])
    assert seen[-1].tolist() == [int(sr.timestep_map[3])]
    assert D.sigma_min == sr.sqrt_recipm1_alphas_cumprod[0] and D.sigma_max == sr.sqrt_recipm1_alphas_cumprod[-1]


# ----------------------------------------------------------------------------- SDEs
SDES = [VPSDE(), SubVPSDE(), VESDE(), VPSDE(beta_min=0.5, beta_max=0.5), VESDE(0.05, 80.0)]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: repr(s))
def test_sigma_of_t_round_trip_against_marginal(sde):
    t = np.array([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0])
    m, s = sde.marginal_coefs(t)
    sigma = s / m  # the SDE's own marginal code
    assert_allclose(t_to_sigma_sde(sde, t), sigma, rtol=1e-13)
    # the inverse goes through log1p/sqrt/asinh: a few ulp times the condition number near t = 0
    assert_allclose(sigma_to_t_sde(sde, sigma), t, rtol=1e-10)


@pytest.mark.parametrize("sde", SDES[:3], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("oracle", [DATA, MIX], ids=["gaussian", "mixture"])
def test_sde_denoiser_of_exact_score_is_exact_denoiser(rng, sde, oracle):
    for pred in ("score", "eps"):
        model = (lambda a, tt: oracle.score(a, tt, sde)) if pred == "score" else (lambda a, tt: oracle.eps(a, tt, sde))
        D = Denoiser.from_sde(model, sde, prediction=pred)
        for sigma in (D.sigma_min, 0.3, 5.0, D.sigma_max):
            x = oracle.sample(5, np.random.default_rng(1)) + sigma * _x(rng, B=5)
            assert_allclose(D(x, np.full(5, sigma)), oracle.denoise(x, sigma), rtol=1e-9, atol=1e-10, err_msg=pred)


def test_sde_denoiser_v_prediction(rng):
    """v = m eps - s x0 (Salimans & Ho 2022) for the VP SDE."""
    sde = VPSDE()

    def v_model(a, tt):
        m, s = sde.marginal_coefs(tt)
        eps = DATA.eps(a, tt, sde)
        x0 = (a - s[:, None] * eps) / m[:, None]
        return m[:, None] * eps - s[:, None] * x0

    D = Denoiser.from_sde(v_model, sde, prediction="v")
    x = _x(rng, B=4, scale=3.0)
    assert_allclose(D(x, 2.5), DATA.denoise(x, 2.5), rtol=1e-11, atol=1e-12)


@given(sigma=st.floats(1e-3, 1e3), m=st.floats(1e-3, 1.0))
def test_preconditioning_reconstructs_x0(sigma, m):
    """For x = x0 + sigma eps and x_t = m x, the four model targets all give back x0."""
    x0, eps = 0.7, -1.3
    x = x0 + sigma * eps
    s = sigma * m
    targets = {"eps": eps, "x0": x0, "v": m * eps - s * x0, "score": -eps / s}
    for pred, F in targets.items():
        c_skip, c_out = preconditioning(pred, sigma, m)
        assert_allclose(c_skip * x + c_out * F, x0, rtol=1e-9, atol=1e-12 * (1 + abs(x)), err_msg=pred)


# ----------------------------------------------------------------------------- kinds, dtypes, errors
def test_dtypes_and_kinds():
    D = Denoiser.from_schedule(lambda a, tt: DATA.eps(a, tt, S), S)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.ones(3, 2, dtype=dt)
        out = D(x, torch.full((3,), float(SIG_TAB[5]), dtype=torch.float32))
        assert out.dtype == torch.float32
    out = D(np.ones((3, 2), np.float16), float(SIG_TAB[5]))
    assert out.dtype == np.float32
    c_skip, c_out, c_in, c_noise = D.coefficients(np.array([SIG_TAB[0], SIG_TAB[999]]))
    assert_array_equal(c_noise, [0, 999])
    assert_allclose(c_in, S.sqrt_alphas_cumprod[[0, 999]], rtol=1e-14)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda D: D(np.zeros((2, 2)), 1e-4), ValueError, r"sigma must lie in \[0.01"),
        (lambda D: D(np.zeros((2, 2)), 200.0), ValueError, "sigma must lie in"),
        (lambda D: D(np.zeros((2, 2)), np.array([1.0, math.nan])), ValueError, "sigma must lie in"),
        (lambda D: D(np.zeros((2, 2)), np.ones(3)), ValueError, r"shape \(B,\)"),
        (lambda D: D(np.zeros((2, 2)), np.ones(2, dtype=np.int64)), TypeError, "floating"),
        (lambda D: D(np.zeros((2, 2), dtype=np.int64), 1.0), TypeError, "floating"),
    ],
)
def test_bad_input(call, exc, match):
    D = Denoiser.from_schedule(lambda a, tt: np.zeros_like(a), S)
    with pytest.raises(exc, match=match):
        call(D)


def test_bad_model_and_construction():
    with pytest.raises(ValueError, match="the output of model must have the shape"):
        Denoiser.from_schedule(lambda a, tt: np.zeros(3), S)(np.zeros((2, 2)), 1.0)
    with pytest.raises(TypeError, match="the output of model must be a numpy array like x"):
        Denoiser.from_schedule(lambda a, tt: torch.zeros(2, 2), S)(np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        Denoiser.from_schedule(lambda a, tt: a, S, prediction="noise")
    with pytest.raises(TypeError, match="Schedule"):
        Denoiser.from_schedule(lambda a, tt: a, VPSDE())
    with pytest.raises(TypeError, match="VPSDE, SubVPSDE or VESDE"):
        Denoiser.from_sde(lambda a, tt: a, S)
    with pytest.raises(TypeError, match="callable"):
        Denoiser.from_schedule(None, S)
    # beyond sigma(1) of an SDE
    D = Denoiser.from_sde(lambda a, tt: a, VESDE())
    with pytest.raises(ValueError, match="sigma must lie in"):
        D(np.zeros((1, 2)), 60.0)


def test_sde_sigma_max_in_float32_is_accepted():
    seen = []
    sde = VPSDE()
    D = Denoiser.from_sde(lambda a, tt: (seen.append(tt), torch.zeros_like(a))[1], sde)
    D(torch.zeros(2, 2), torch.full((2,), D.sigma_max, dtype=torch.float32))  # rounded up or down by float32
    assert seen[-1].dtype == torch.float32 and float(seen[-1].max()) <= 1.0
    assert_allclose(seen[-1].numpy(), [1.0, 1.0], rtol=1e-6)


def test_cosine_schedule_range():
    s = cosine_schedule(100)
    D = Denoiser.from_schedule(lambda a, tt: np.zeros_like(a), s)
    assert D.sigma_min == pytest.approx(s.sqrt_recipm1_alphas_cumprod[0], rel=1e-15)
    assert D.sigma_max == pytest.approx(s.sqrt_recipm1_alphas_cumprod[-1], rel=1e-15)


# ----------------------------------------------------------------------------- the oracle's denoiser
def test_mixture_denoise_against_quadrature():
    """E[x0 | x0 + sigma n = x] for 1-D mixture data by scipy quad of x0 p(x0) N(x; x0, sigma^2)."""
    from scipy.integrate import quad

    mix = GaussianMixture([0.3, 0.7], [[-1.0], [0.8]], [[[0.05]], [[0.2]]])
    comps = [(w, m[0], c[0, 0]) for w, m, c in zip(mix.weights, mix.means, mix.covs)]

    def npdf(y, m, v):
        return math.exp(-0.5 * (y - m) ** 2 / v) / math.sqrt(2 * math.pi * v)

    def prior(y):
        return sum(w * npdf(y, m, v) for w, m, v in comps)

    for sigma in (1e-3, 0.05, 0.7, 3.0, 40.0):
        for x in (-1.5, 0.0, 0.3, 2.0):

            def lik(y):
                return npdf(x, y, sigma * sigma)

            # the posterior lives within 12 sigma of x and within the prior's +-5
            lo, hi = max(x - 12 * sigma, -5.0), min(x + 12 * sigma, 5.0)
            pts = [p for p in (x, -1.0, 0.8) if lo < p < hi]
            num = quad(lambda y: y * prior(y) * lik(y), lo, hi, points=pts, limit=200, epsabs=0, epsrel=1e-11)[0]
            den = quad(lambda y: prior(y) * lik(y), lo, hi, points=pts, limit=200, epsabs=0, epsrel=1e-11)[0]
            got = mix.denoise(np.array([[x]]), sigma)[0, 0]
            assert got == pytest.approx(num / den, rel=1e-9, abs=1e-12), (sigma, x)


@pytest.mark.parametrize("oracle", [DATA, MIX], ids=["gaussian", "mixture"])
def test_denoise_is_tweedie(rng, oracle):
    """D = x + sigma^2 grad log p_sigma(x) (Tweedie), with the score from the separate score code."""
    for sigma in (0.0, 1e-3, 0.2, 5.0, 150.0):
        x = oracle.sample(6, np.random.default_rng(0)) + sigma * _x(rng, B=6)
        ref = x + sigma**2 * oracle.score_sigma(x, sigma)
        # x + sigma^2 score cancels at large sigma: compare on the scale of x
        assert_allclose(oracle.denoise(x, sigma), ref, rtol=0, atol=1e-13 * (1 + np.abs(x).max()))
    # sigma per sample, torch and numpy alike
    x = _x(rng, B=3)
    sig = np.array([0.1, 1.0, 10.0])
    rows = np.stack([oracle.denoise(x[i : i + 1], sig[i])[0] for i in range(3)])
    assert_allclose(oracle.denoise(x, sig), rows, rtol=1e-14)
    t = oracle.denoise(torch.from_numpy(x).float(), torch.from_numpy(sig).float())
    assert t.dtype == torch.float32
    assert_allclose(t.numpy(), rows, rtol=1e-5, atol=1e-6)


def test_denoise_bad_sigma():
    x = np.zeros((2, 2))
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        DATA.denoise(x, -1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        MIX.denoise(x, np.array([1.0, math.inf]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        DATA.denoise(x, np.ones(3))
    with pytest.raises(TypeError, match="sigma must be a float or an array of x's kind"):
        DATA.denoise(x, torch.ones(2))


# ----------------------------------------------------------------------------- the SDE's score from D
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_score_from_denoiser_is_the_exact_score_of_the_marginal(rng, sde):
    """Tweedie through x = x_t/m: (D(x; sigma) - x)/(sigma^2 m) with the oracle's exact D equals
    the oracle's exact grad log q_t (its own marginal C_t = m^2 cov + s^2 I), numpy float64 and
    torch float32, t a scalar or one per sample, from t = eps to 1."""
    from diffmath.denoiser import score_from_denoiser

    t = np.array([sde.default_eps, 0.01, 0.1, 0.37, 0.8, 1.0, 0.5])
    m, std = sde.marginal_coefs(t)
    sig = t_to_sigma_sde(sde, t)

    def check(got, ref, x, ulp):
        # D - x cancels, losing ~ulp(|x|) of x = x_t/m, i.e. |x| ulp / (sigma^2 m) of the score
        # (the conditioning of the Tweedie form; harmless to a sampler, whose step scales the
        # score by g^2 dt ~ d(sigma^2) m^2); plus the rounding of the result
        bound = 16 * ulp * (np.abs(np.asarray(x, np.float64)).max(1) / m + 1.0) / (sig * sig * m)
        err = np.abs(np.asarray(got, np.float64) - ref).max(1)
        assert np.all(err <= bound + 8 * ulp * np.abs(ref).max(1)), (err, bound)

    for data in (DATA, MIX):
        score = score_from_denoiser(data.denoise, sde)
        x = _x(rng) * np.maximum(std, 1.0)[:, None]
        got = score(x, t)
        ref = data.score(x, t, sde)
        assert got.dtype == np.float64 and got.shape == x.shape
        check(got, ref, x, 2.0**-52)
        assert_allclose(score(x, 0.3), data.score(x, 0.3, sde), rtol=1e-12, atol=1e-13)
        xt = torch.as_tensor(x, dtype=torch.float32)
        got32 = score(xt, torch.as_tensor(t))
        assert got32.dtype == torch.float32
        check(got32.numpy(), ref, xt.numpy(), 2.0**-24)


def test_score_from_denoiser_of_a_network_is_minus_eps_over_s(rng):
    """An eps-model's Denoiser.from_schedule under score_from_denoiser gives -eps(x_t, t')/s(t)
    (Song et al. 2021, App. B), t' the model time at sigma(t) = s/m (log-sigma interpolation),
    clamped to index 0 below the table. Reference: the eps of a fixed random network queried by
    hand at t' found with scipy's root finder on the table's own log sigma."""
    from scipy.optimize import brentq

    from diffmath.denoiser import score_from_denoiser

    s = linear_schedule(200, 5e-4, 0.08)  # sigma_0 = 0.022 > sigma(1e-3), sigma_199 = 57 < sigma(1) = 152
    sde = VPSDE(0.1, 20.0, N=200)
    W = rng.standard_normal((2, 2))

    def eps_model(xt, tt):
        return np.tanh(xt @ W + 0.01 * np.asarray(tt, np.float64)[:, None])

    score = score_from_denoiser(Denoiser.from_schedule(eps_model, s, "eps", clamp_time=True), sde)
    t = np.array([1e-3, 0.05, 0.25, 0.5, 0.999, 1.0])
    m, std = sde.marginal_coefs(t)
    x_t = _x(rng, B=t.size)
    log_sig = 0.5 * np.log(np.expm1(-s.log_alphas_cumprod))  # log sigma_k, increasing in k

    def time_of(sig):
        ls = math.log(sig)
        if ls <= log_sig[0]:
            return 0.0
        if ls >= log_sig[-1]:
            return 199.0
        k = int(np.searchsorted(log_sig, ls)) - 1
        # the point of the segment [k, k+1] whose linear log sigma is ls
        return brentq(lambda u: log_sig[k] + (u - k) * (log_sig[k + 1] - log_sig[k]) - ls, k, k + 1, xtol=1e-14)

    tp = np.array([time_of(v) for v in std / m])
    assert tp[0] == 0.0 and tp[-1] == 199.0  # t = 1e-3 lies below sigma_0, t = 1 above sigma_199
    ref = -eps_model(x_t, tp) / std[:, None]
    assert_allclose(score(x_t, t), ref, rtol=1e-12, atol=1e-12)


def test_clamp_time_keeps_sigma_and_clamps_only_the_model_time(rng):
    """Off the table a default Denoiser refuses sigma; with clamp_time=True the coefficients are
    sigma's own (D = x - sigma eps for an eps model) and the model gets the end index."""
    seen = {}

    def eps_model(xt, tt):
        seen["t"] = np.asarray(tt)
        return np.full_like(xt, 0.5)

    lo, hi = float(SIG_TAB[0]), float(SIG_TAB[-1])
    with pytest.raises(ValueError, match="sigma must lie in"):
        Denoiser.from_schedule(eps_model, S)(_x(rng, B=2), np.array([0.5 * lo, 1.0]))
    D = Denoiser.from_schedule(eps_model, S, clamp_time=True)
    x = _x(rng, B=3)
    sig = np.array([0.5 * lo, 1.0, 3.0 * hi])
    out = D(x, sig)
    assert_allclose(out, x - sig[:, None] * 0.5, rtol=1e-15)
    assert seen["t"][0] == 0.0 and seen["t"][2] == 999.0 and 0 < seen["t"][1] < 999
    with pytest.raises(ValueError, match="sigma must lie in"):
        D(x, np.array([0.0, 1.0, 1.0]))


def test_score_from_denoiser_bad_input():
    from diffmath.denoiser import score_from_denoiser

    with pytest.raises(TypeError, match="denoiser must be callable"):
        score_from_denoiser(None, VPSDE())
    with pytest.raises(TypeError, match="sde must be"):
        score_from_denoiser(DATA.denoise, S)
    score = score_from_denoiser(DATA.denoise, VPSDE())
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        score(np.zeros((2, 2)), np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"a batch of 3 times t does not match x"):
        score(np.zeros((2, 2)), np.array([0.5, 0.5, 0.5]))
