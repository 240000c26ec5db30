"""DDPM and DDIM steps on float32 data where 1/sqrt(abar_t) exceeds float32's range
(abar_t < ~1e-77): the float32 tables hold inf there and x0 = inf x_t - inf eps was NaN from
finite input. The step must give the exact value rounded to float32 (+-inf with the right sign
beyond its range), against DDPM eq. 7/15 and DDIM eq. 12/16 evaluated in mpmath."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from diffmath.samplers import ddim_step, ddpm_step
from diffmath.schedules import Schedule

# 60 steps of beta = 0.999: abar_t = 1e-3(t+1), below 1e-77 from t = 25 on
BETAS = np.full(60, 0.999)
X = np.array([1.0, -1.0, 0.5, 1e-30, -0.25, 0.0], np.float32)
E = np.array([0.5, -2.0, 0.5, 0.0, -0.25, 0.0], np.float32)
Z = np.array([0.3, -0.7, 1.1, 0.0, 2.0, -1.0], np.float32)


def _abar(t):
    if t < 0:
        return mp.mpf(1)
    p = mp.mpf(1)
    for b in BETAS[: t + 1].tolist():
        p *= 1 - mp.mpf(b)
    return p


def _x0(a_t, x, e):
    return (mp.mpf(float(x)) - mp.sqrt(1 - a_t) * mp.mpf(float(e))) / mp.sqrt(a_t)


def _ddpm_ref(t, variance, clip):
    """DDPM eq. 15 (x0, clipped to [-c, c] if given), eq. 7 (mean), std sqrt(beta) or sqrt(beta~)."""
    with mp.workdps(40):
        a_t, a_p, b = _abar(t), _abar(t - 1), mp.mpf(BETAS[t])
        coef1 = b * mp.sqrt(a_p) / (1 - a_t)
        coef2 = (1 - a_p) * mp.sqrt(1 - b) / (1 - a_t)
        std = mp.sqrt(b) if variance == "large" else mp.sqrt(b * (1 - a_p) / (1 - a_t))
        out = []
        for x, e, z in zip(X, E, Z):
            x0 = _x0(a_t, x, e)
            if clip is not None:
                x0 = min(max(x0, -clip), clip)
            out.append(coef1 * x0 + coef2 * mp.mpf(float(x)) + std * mp.mpf(float(z)))
        return out


def _ddim_ref(t, tp, eta):
    with mp.workdps(40):
        a_t, a_p = _abar(t), _abar(tp)
        sigma = eta * mp.sqrt((1 - a_p) / (1 - a_t)) * mp.sqrt(1 - a_t / a_p)
        return [
            mp.sqrt(a_p) * _x0(a_t, x, e) + mp.sqrt(1 - a_p - sigma**2) * mp.mpf(float(e)) + sigma * mp.mpf(float(z))
            for x, e, z in zip(X, E, Z)
        ]


def _assert_float32_of(out, ref):
    out = np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float64).reshape(-1)
    with np.errstate(over="ignore"):
        ref32 = np.array([float(np.float32(float(r))) for r in ref])
    assert not np.isnan(out).any(), out
    inf = np.isinf(ref32)
    assert np.array_equal(out[inf], ref32[inf]), (out, ref32)
    assert_allclose(out[~inf], ref32[~inf], rtol=4 * 2.0**-23, atol=1e-44)


@pytest.mark.parametrize("t", [25, 40, 59])
@pytest.mark.parametrize("variance,clip", [("small", None), ("large", None), ("small", 1.0)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ddpm_step_beyond_float32_range(t, variance, clip, kind):
    s = Schedule.from_betas(BETAS)
    assert s.sqrt_recip_alphas_cumprod[t] > np.finfo(np.float32).max  # the case: inf in float32
    x, e, z = (torch.tensor(v) if kind == "torch" else v for v in (X[None], E[None], Z[None]))
    out = ddpm_step(s, x, t, e, z, variance=variance, clip_x0=clip)
    assert out.dtype in (np.float32, torch.float32)
    _assert_float32_of(out, _ddpm_ref(t, variance, clip))


@pytest.mark.parametrize("t,tp,eta", [(59, 58, 0.0), (59, 30, 0.0), (40, 20, 1.0), (30, -1, 0.0), (59, 10, 0.5)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ddim_step_beyond_float32_range(t, tp, eta, kind):
    s = Schedule.from_betas(BETAS)
    x, e, z = (torch.tensor(v) if kind == "torch" else v for v in (X[None], E[None], Z[None]))
    if kind == "torch":  # tensor indices too
        tt, tpp = torch.tensor([t]), torch.tensor([tp])
    else:
        tt, tpp = t, tp
    out = ddim_step(s, x, tt, tpp, e, noise=z if eta > 0 else None, eta=eta)
    assert out.dtype in (np.float32, torch.float32)
    _assert_float32_of(out, _ddim_ref(t, tp, eta))


def test_ordinary_float32_steps_keep_their_float32_arithmetic():
    # steps whose abar_t fits float32 are untouched: the same bits as a float32 evaluation of the
    # folded update (which is what they were before the float64 path existed)
    s = Schedule.from_betas(BETAS)
    t = 10
    c = [
        np.float32(v[t])
        for v in (
            s.sqrt_recip_alphas_cumprod,
            s.sqrt_recipm1_alphas_cumprod,
            s.posterior_mean_coef1,
            s.posterior_mean_coef2,
        )
    ]
    x0 = c[0] * X - c[1] * E
    mean = c[2] * x0 + c[3] * X
    std = np.float32(np.exp(0.5 * s.posterior_log_variance_clipped[t]))
    assert np.array_equal(ddpm_step(s, X[None], t, E[None], Z[None])[0], mean + std * Z)
