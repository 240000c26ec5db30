"""Behaviour shared by every sampler loop: numpy and torch (and CUDA), explicit generators,
progress bars, interruption without corrupting the caller's arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from diffmath.oracle import GaussianData
from diffmath.samplers import (
    annealed_langevin,
    sample_ddim,
    sample_ddpm,
    sample_ode,
    sample_ode_heun,
    sample_pc,
    sample_sde,
)
from diffmath.schedules import linear_schedule
from diffmath.sde import VPSDE
from tests._tables import refusals

S = linear_schedule(100)
SDE = VPSDE(N=50)
DATA = GaussianData([0.2, -0.1], [[0.5, 0.1], [0.1, 0.4]])


def _eps(x, t):
    return DATA.eps(x, t, S)


def _score(x, t):
    return DATA.score(x, t, SDE)


def _sigma_score(x, sigma):
    return DATA.score_sigma(x, sigma)


# name -> callable(shape, generator, **kw)
LOOPS = {
    "ddpm": lambda **kw: sample_ddpm(_eps, S, variance="large", **kw),
    "ddim": lambda **kw: sample_ddim(_eps, S, steps=10, eta=0.5, **kw),
    "sde": lambda **kw: sample_sde(_score, SDE, steps=20, **kw),
    "pc": lambda **kw: sample_pc(_score, SDE, **kw),
    "heun": lambda **kw: sample_ode_heun(_score, SDE, steps=10, **kw),
    "annealed": lambda **kw: annealed_langevin(_sigma_score, [1.0, 0.3, 0.1], n_steps_each=5, step_lr=1e-3, **kw),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_numpy_and_torch_generators_give_their_kind_reproducibly(name):
    run = LOOPS[name]
    a = run(shape=(6, 2), generator=np.random.default_rng(3))
    b = run(shape=(6, 2), generator=np.random.default_rng(3))
    c = run(shape=(6, 2), generator=np.random.default_rng(4))
    assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (6, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and np.all(np.isfinite(a))
    ta = run(shape=(6, 2), generator=torch.Generator().manual_seed(3))
    tb = run(shape=(6, 2), generator=torch.Generator().manual_seed(3))
    assert isinstance(ta, torch.Tensor) and ta.dtype == torch.float32 and torch.equal(ta, tb)


def test_deterministic_loops_agree_across_kinds():
    X = np.random.default_rng(0).normal(size=(4, 2))
    a = sample_ddim(_eps, S, steps=10, x_T=X)
    b = sample_ddim(_eps, S, steps=10, x_T=torch.tensor(X))
    assert_allclose(b.numpy(), a, rtol=1e-12)
    a = sample_ode(_score, SDE, x_T=X, rtol=1e-6, atol=1e-6)
    b = sample_ode(_score, SDE, x_T=torch.tensor(X), rtol=1e-6, atol=1e-6)
    assert_allclose(b.numpy(), a, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(LOOPS))
def test_loops_run_on_cuda(name):
    g = torch.Generator(device="cuda").manual_seed(0)
    out = LOOPS[name](shape=(8, 2), generator=g)
    assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
    X = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu = sample_ddim(_eps, S, steps=10, x_T=X)
    gpu = sample_ddim(_eps, S, steps=10, x_T=X.cuda())
    assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOOPS))
def test_progress_bar(name, capsys):
    LOOPS[name](shape=(2, 2), generator=np.random.default_rng(0), progress=True)
    err = capsys.readouterr().err
    assert "it" in err and ("%" in err or "|" in err)
    LOOPS[name](shape=(2, 2), generator=np.random.default_rng(0), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", [n for n in LOOPS])
def test_keyboard_interrupt_leaves_inputs_intact(name):
    X = np.random.default_rng(0).normal(size=(3, 2))
    X_copy = X.copy()
    calls = []

    def stop(**kw):
        calls.append(kw)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LOOPS[name](shape=(3, 2), x_T=X, generator=np.random.default_rng(0), callback=stop)
    assert np.array_equal(X, X_copy)
    out = LOOPS[name](shape=(3, 2), x_T=X, generator=np.random.default_rng(0))
    assert np.array_equal(X, X_copy) and out is not X


def test_sample_ode_interrupt_leaves_inputs_intact():
    X = np.random.default_rng(0).normal(size=(3, 2))
    X_copy = X.copy()
    n = [0]

    def score(x, t):
        n[0] += 1
        if n[0] == 5:
            raise KeyboardInterrupt
        return _score(x, t)

    with pytest.raises(KeyboardInterrupt):
        sample_ode(score, SDE, x_T=X)
    assert np.array_equal(X, X_copy)


# ----------------------------------------------------------------------------- bad input
BAD_INPUT = [
    # the generator's kind must match x_T
    (
        sample_sde,
        dict(score_fn=_score, sde=SDE, x_T=torch.zeros(2, 2), generator=np.random.default_rng(0)),
        TypeError,
        "numpy.random.Generator but x_T is a torch tensor",
    ),
    (
        sample_sde,
        dict(score_fn=_score, sde=SDE, x_T=np.zeros((2, 2)), generator=torch.Generator()),
        TypeError,
        "torch.Generator but x_T is a numpy array",
    ),
    (sample_sde, dict(score_fn=_score, sde=SDE, shape=(2, 2), generator=42), TypeError, "generator must be"),
    (
        sample_sde,
        dict(score_fn=_score, sde=SDE, shape=(3, 2), x_T=np.zeros((2, 2))),
        ValueError,
        r"x_T must have the requested shape \(3, 2\); got \(2, 2\)",
    ),
]


@refusals(BAD_INPUT)
def test_bad_input(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)
