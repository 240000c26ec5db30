"""diffmath's solvers against diffusers' and k-diffusion's own loops, same algorithm, same ladder,
same (exact) denoiser: the output mean and variance on Gaussian data, identified exactly by the
oracle from each loop run in float64 (benchmarks/peers.py), agree to <= 1e-6 relative.
Skipped where a peer is not installed (``make bench`` installs both)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

KDS = peers.load_k_diffusion()
DIFFUSERS = peers.load_diffusers()
NFES = (5, 10, 20)


def _rel(a, b):
    dm = abs(float(a.mean[0]) - float(b.mean[0])) / abs(float(b.mean[0]))
    dv = abs(float(a.cov[0, 0]) - float(b.cov[0, 0])) / float(b.cov[0, 0])
    return max(dm, dv)


@pytest.mark.skipif(KDS is None, reason="k-diffusion is not installed (make bench installs it)")
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "lms"])
@pytest.mark.parametrize("ladder", ["karras", "exponential"])
def test_k_diffusion_same_output(name, ladder):
    for n in NFES:
        sig = peers.kd_ladder(KDS, ladder, (n + 1) // 2 if name == "heun" else n)
        theirs = peers.DATA.exact_solver_output(peers.kd_solver(KDS, name), sig)
        ours = peers.DATA.exact_solver_output(name, sig)
        assert _rel(theirs, ours) <= 1e-6, (name, ladder, n)


@pytest.mark.skipif(KDS is None, reason="k-diffusion is not installed")
def test_k_diffusion_3m_differs_by_the_third_order_term():
    # docs/samplers.md: k-diffusion's 3M carries half of the exact J_2 term; the outputs differ
    sig = peers.kd_ladder(KDS, "exponential", 10)
    theirs = peers.DATA.exact_solver_output(peers.kd_solver(KDS, "dpmpp_3m_sde", eta=0.0), sig)
    ours = peers.DATA.exact_solver_output("dpmpp_3m_sde", sig, eta=0.0)
    assert _rel(theirs, ours) > 1e-3


@pytest.mark.skipif(KDS is None, reason="k-diffusion is not installed")
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("ladder", ["karras", "exponential"])
def test_k_diffusion_3m_is_the_damped_third_order(eta, ladder):
    # ... and third_order="damped" (J_2 / 2) is k-diffusion's 3M, with and without the SDE noise
    # (both loops draw it through the oracle's basis noise_sampler, so the noise terms match too)
    for n in NFES:
        sig = peers.kd_ladder(KDS, ladder, n)
        theirs = peers.DATA.exact_solver_output(peers.kd_solver(KDS, "dpmpp_3m_sde", eta=eta), sig)
        ours = peers.DATA.exact_solver_output("dpmpp_3m_sde", sig, eta=eta, third_order="damped")
        assert _rel(theirs, ours) <= 1e-6, (eta, ladder, n, _rel(theirs, ours))


@pytest.mark.skipif(DIFFUSERS is None, reason="diffusers is not installed (pip install -e '.[bench]')")
@pytest.mark.parametrize("cls_name", list(peers.DIFFUSERS))
@pytest.mark.parametrize("ladder", list(peers.LADDER_FLAGS))
def test_diffusers_same_output(cls_name, ladder):
    name = peers.DIFFUSERS[cls_name][0]
    for n in NFES:
        steps = peers.diffusers_steps(cls_name, n)
        sig, start = peers.diffusers_ladder_and_start(DIFFUSERS, cls_name, ladder, steps)
        theirs = peers.DATA.exact_solver_output(
            peers.diffusers_solver(DIFFUSERS, cls_name, ladder, steps, "scheduler"), sig, start=start
        )
        ours = peers.DATA.exact_solver_output(name, sig, start=start)
        assert _rel(theirs, ours) <= 1e-6, (cls_name, ladder, n, _rel(theirs, ours))


@pytest.mark.parametrize("start", [None, 157.5])
def test_exact_flow_limit_is_the_limit_of_a_convergent_solver(start):
    # the closed form against DPM-Solver++(2M) with 2000 levels (error ~ h^2 ~ 3e-5) and Heun
    # (EDM Alg. 1) with 1000: both tend to it; the closed form shares no code with either
    import numpy as np

    sig = peers.sigmas_exponential(2000, peers.SIG_MIN, peers.SIG_MAX)
    ref = peers.exact_flow_limit(sig, start)
    for name, levels in (("dpmpp_2m", 2000), ("heun", 1000)):
        s = peers.sigmas_exponential(levels, peers.SIG_MIN, peers.SIG_MAX)
        out = peers.DATA.exact_solver_output(name, s, start=start)
        assert _rel(out, ref) <= 1e-4, name
    if start is None:  # and it is not the data: the start N(0, sigma_max^2) and the last step's D cost 2.97e-5 nats
        assert np.isclose(ref.kl(peers.DATA), 2.967e-5, rtol=1e-3)
        # the exact flow carried to sigma ~ 0 (a ladder ending at 1e-9, no final D) keeps the start's
        # missing mean: m s / sigma_max off, (m s / sigma_max)^2 / (2 s^2) = m^2 / (2 sigma_max^2) = 5.04e-6 nats
        to_zero = peers.exact_flow_limit(np.array([peers.SIG_MAX, 1e-9]))
        m = float(peers.DATA.mean[0])
        assert np.isclose(to_zero.kl(peers.DATA), (m / peers.SIG_MAX) ** 2 / 2, rtol=1e-3)
        assert np.isclose(to_zero.kl(peers.DATA), 5.04e-6, rtol=2e-3)
