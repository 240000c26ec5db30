"""Reverse-SDE solvers: the reverse-diffusion predictor against Song et al. 2021 Alg. 2-3
written out here, Euler-Maruyama's weak order 1 towards the closed-form marginal, and the
PC loop's time grid."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from diffmath.oracle import GaussianData
from diffmath.samplers import euler_maruyama_step, reverse_diffusion_step, sample_pc, sample_sde, time_grid
from diffmath.sde import VESDE, VPSDE, SubVPSDE
from tests._tables import refusals


def _score(x, t):
    return -x * (1.0 + t[:, None])


def test_reverse_diffusion_is_song_alg3_for_vp():
    # Alg. 3 (VP): x_{i-1} = (2 - sqrt(1 - beta_i)) x_i + beta_i s(x_i, i) + sqrt(beta_i) z,
    # beta_i = linspace(beta_min/N, beta_max/N, N)[i] (score_sde's discrete_betas).
    N = 1000
    sde = VPSDE(N=N)
    betas = np.linspace(0.1 / N, 20.0 / N, N)
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(2, 3, 2))
    rsde = sde.reverse(_score)
    for i in (1, 500, 999):
        t = np.full(3, i / (N - 1))
        ref = (2 - np.sqrt(1 - betas[i])) * x + betas[i] * _score(x, t) + np.sqrt(betas[i]) * z
        assert_allclose(reverse_diffusion_step(rsde, x, t, z), ref, rtol=1e-13)


def test_reverse_diffusion_is_song_alg2_for_ve():
    # Alg. 2 (VE): x_{i-1} = x_i + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_i^2 - sigma_{i-1}^2) z.
    N = 500
    sde = VESDE(N=N)
    sig = np.geomspace(0.01, 50.0, N)
    rng = np.random.default_rng(1)
    x, z = rng.normal(size=(2, 3, 2))
    rsde = sde.reverse(_score)
    for i in (0, 1, 250, 499):
        t = np.full(3, max(i / (N - 1), 1e-5))
        d2 = sig[i] ** 2 - (sig[i - 1] ** 2 if i > 0 else 0.0)
        ref = x + d2 * _score(x, t) + np.sqrt(d2) * z
        got = reverse_diffusion_step(rsde, x, np.full(3, i / (N - 1)), z, t_score=t)
        assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_euler_maruyama_has_weak_order_one(sde):
    # Started from the exact q_1 and driven by the exact score, the reverse SDE's law at eps is
    # q_eps = N(m mu, m^2 Sigma + s^2 I) (built here from marginal_prob). The EM chain's law
    # (propagated exactly through euler_maruyama_step by the oracle) approaches it with
    # covariance error ~ C / steps.
    mu, cov = np.array([0.5, -0.3]), np.array([[0.04, 0.01], [0.01, 0.02]])
    data = GaussianData(mu, cov)
    eps = 1e-3
    m, s = sde.marginal_prob(np.ones((1, 1)), eps)
    target = float(m[0, 0]) ** 2 * cov + float(np.asarray(s)) ** 2 * np.eye(2)
    start = data.marginal(sde, 1.0)
    errs = []
    for n in (100, 200, 400, 800):
        out = data.exact_sde_output(sde, "euler_maruyama", n, eps=eps, denoise=False, start=start)
        errs.append(np.abs(out.cov - target).max())
    slope = np.polyfit(np.log([100, 200, 400, 800]), np.log(errs), 1)[0]
    assert slope < -0.9, (slope, errs)


def test_euler_maruyama_forward_direction_and_noise_free_step():
    # VP at t = 0.3, derived by hand: beta = 0.1 + 0.3 * 19.9 = 6.07, forward drift -beta/2 x,
    # g = sqrt(beta). Forward step dt = 0.01: x' = (1 - 0.03035) x + sqrt(6.07) * 0.1 z.
    # Reverse drift with score -1.3 x: -beta/2 x - beta (-1.3 x) = 0.8 beta x = 4.856 x, so the
    # noise-free step dt = -0.01 gives x' = (1 - 0.04856) x.
    sde = VPSDE()
    x = np.array([[1.0, 2.0]])
    z = np.array([[0.5, -0.5]])
    assert_allclose(euler_maruyama_step(sde, x, 0.3, 0.01, z), 0.96965 * x + np.sqrt(6.07) * 0.1 * z, rtol=1e-14)
    rsde = sde.reverse(_score)
    assert_allclose(euler_maruyama_step(rsde, x, 0.3, -0.01), 0.95144 * x, rtol=1e-14)


def test_time_grid_and_pc_levels():
    assert_allclose(time_grid(VPSDE(), 4), [1.0, 0.75025, 0.5005, 0.25075, 0.001], rtol=1e-15)
    seen = []

    def score(x, t):
        seen.append(float(t[0]))
        return -x

    sde = VPSDE(N=30)
    sample_pc(score, sde, (2, 1), corrector="none", generator=np.random.default_rng(0))
    assert_allclose(seen, np.maximum(np.arange(29, -1, -1) / 29, 1e-3), rtol=1e-6)
    seen.clear()
    sample_pc(
        score,
        VESDE(N=40),
        (2, 1),
        predictor="euler_maruyama",
        steps=5,
        n_corrector_steps=2,
        generator=np.random.default_rng(0),
    )
    g = time_grid(VESDE(), 5)
    assert_allclose(seen, np.stack([g[:-1]] * 3, 1).reshape(-1), rtol=1e-6)  # 2 corrector + 1 predictor per level


def test_pc_default_corrector_is_batch_mean_and_gives_the_right_variance_in_1d():
    # Issue 11 item 4: on 1-D data N(0.5, 0.1^2) the default corrector step is score_sde's
    # batch-mean one, whose large-batch limit the oracle propagates exactly
    # (exact_sde_output "predictor_corrector", from expected_norm). 4000 samples, seed 0: the
    # sample mean within 5 SE (sqrt(v/n)) and the variance within 5 SE (v sqrt(2/n)) of the
    # exact Gaussian. The opt-in per-sample step ("sample") has tails ~ 1/r in 1-D: the same
    # draws give a variance orders of magnitude above the data's.
    data = GaussianData([0.5], [[0.01]])
    sde = VPSDE(N=100)
    n = 4000
    exact = data.exact_sde_output(sde, "predictor_corrector", 100, snr=0.16)
    m, v = float(exact.mean[0]), float(exact.cov[0, 0])

    def run(**kw):
        return sample_pc(
            lambda x, t: data.score(x, t, sde),
            sde,
            (n, 1),
            predictor="euler_maruyama",
            steps=100,
            snr=0.16,
            generator=np.random.default_rng(0),
            **kw,
        )

    x = run()
    assert np.array_equal(x, run(corrector_norm="batch"))
    assert abs(x.mean() - m) < 5 * np.sqrt(v / n), (x.mean(), m)
    assert abs(x.var(ddof=1) - v) < 5 * v * np.sqrt(2 / n), (x.var(ddof=1), v)
    xs = run(corrector_norm="sample")
    assert xs.var() > 100 * v, xs.var()


# ----------------------------------------------------------------------------- bad input
_VP, _X = VPSDE(), np.ones((2, 3))


def _em_row(reverse, t, dt, match):
    return (
        euler_maruyama_step,
        dict(rsde=_VP.reverse(_score) if reverse else _VP, x=_X, t=t, dt=dt, noise=_X),
        ValueError,
        match,
    )


def _loop_row(loop, kw, match):
    return (loop, dict(score_fn=_score, sde=VPSDE(), shape=(2, 3), **kw), ValueError, match)


BAD_INPUT = [
    _em_row(True, 0.5, 0.0, r"dt must be finite and non-zero.*dt = 0.0"),
    _em_row(True, 0.5, -0.6, r"t \+ dt must stay in \[0, 1\].*dt = -0.6"),
    _em_row(True, 0.0, -0.1, r"t \+ dt must stay in \[0, 1\]; got t = 0.0, dt = -0.1"),
    # the direction: a ReverseSDE runs backward in time (dt < 0), a forward SDE forward (dt > 0)
    _em_row(True, 0.5, 0.1, r"dt must be < 0 for a ReverseSDE.*dt = 0.1"),
    _em_row(False, 0.5, -0.1, r"dt must be > 0 for a forward SDE.*dt = -0.1"),
    _em_row(True, 1.2, -0.1, r"t must lie in \[0, 1\].*1.2"),
    _loop_row(sample_pc, dict(snr=0.0), r"snr must be finite and > 0; got snr = 0.0"),
    _loop_row(sample_sde, dict(steps=0), r"steps must be >= 1; got steps = 0"),
    _loop_row(sample_sde, dict(eps=0), r"eps \(the stopping time\) must lie in \(0, 1.0\); got eps = 0"),
    _loop_row(sample_pc, dict(steps=10), "steps must equal sde.N = 1000"),
    _loop_row(sample_pc, dict(predictor="heun"), "predictor must be"),
    # the loop names a score of the wrong shape
    (
        sample_sde,
        dict(score_fn=lambda y, t: y[:, :1], sde=VPSDE(), shape=(2, 3), steps=3),
        ValueError,
        r"score_fn returned shape \(2, 1\) but x has shape \(2, 3\)",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
