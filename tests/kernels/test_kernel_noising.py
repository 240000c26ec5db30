"""q_sample: against the float64 numpy reference (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with
abar a plain cumulative product) and the core diffmath.forward.q_sample, on every path."""

import gc
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffmath as dm
import diffmath.kernels as K
from diffmath._array import _PER_SCHEDULE
from tests.kernels._kernel_strategies import DTYPES, KSET, TOL, make, schedules, shapes, timestep, tnp
from tests.reference._kernel_ref import q_sample as q_ref
from tests.reference._kernel_ref import rel_err, stream_normal


@settings(KSET)
@given(s=schedules(), shape=shapes(), dtype=st.sampled_from(DTYPES), data=st.data(), seed=st.integers(0, 2**32))
def test_q_sample_matches_reference(path, s, shape, dtype, data, seed):
    _, dev = path
    t = data.draw(timestep(s.num_timesteps, shape[0]))
    (x0, noise), (x0n, nn) = make(shape, dtype, dev, seed, 2)
    out = K.q_sample(s, x0, t.to(dev) if isinstance(t, torch.Tensor) else t, noise=noise)
    assert out.dtype == dtype and out.shape == x0.shape and out.is_contiguous()
    ref = q_ref(s.betas, x0n, tnp(t), nn)
    mag = q_ref(s.betas, np.abs(x0n), tnp(t), np.abs(nn))  # both coefficients are >= 0
    assert rel_err(out.cpu().double().numpy(), ref, mag) <= TOL[dtype]
    core = dm.forward.q_sample(s, torch.from_numpy(x0n), t, torch.from_numpy(nn)).numpy()
    assert rel_err(out.cpu().double().numpy(), core, mag) <= TOL[dtype]


@pytest.mark.parametrize("shape,offset", [((3, 5, 7), 0), ((2, 2051), 7), ((5, 3), 2**40 + 1), ((1,), 3)])
def test_in_kernel_noise_is_the_reference_stream(triton_path, shape, offset):
    """Independent check of q_sample's in-kernel eps (per-sample and flat grids, aligned and
    unaligned offsets): with x0 = 0, x_t / sqrt(1 - abar_t) is Philox draw offset + i of the
    numpy reference stream (tests/reference/_kernel_ref.py)."""
    s = dm.cosine_schedule(100)
    x0 = torch.zeros(shape, device=triton_path)
    for t in (17, torch.arange(shape[0]) * 7 % 100 + 1):
        c = s.sqrt_one_minus_alphas_cumprod[tnp(t)]
        c = c.reshape((-1,) + (1,) * (len(shape) - 1)) if np.ndim(c) else c
        z = (
            K.q_sample(s, x0, t.to(triton_path) if isinstance(t, torch.Tensor) else t, seed=123, offset=offset)
            .cpu()
            .double()
            .numpy()
            / c
        )
        d = np.abs(z.reshape(-1) - stream_normal(123, offset, z.size))
        assert np.median(d) < 1e-6 and d.max() < 1e-4, (np.median(d), d.max())  # float32 Box-Muller and scaling


@pytest.mark.parametrize("shape,offset", [((3, 5, 7), 0), ((2, 2051), 7), ((5, 3), 2**40 + 1), ((1,), 3)])
def test_in_kernel_noise_is_the_stream(path, shape, offset):
    """seed= draws element i from draw offset + i: the same as noise=randn(shape, seed, offset),
    the identity docs/kernels.md promises on both paths. A consistency test (randn is the same
    stream, computed by the same code on the Triton path); the Triton stream is checked against
    the independent reference above and in test_kernel_noise.py, the torch path's stream has no
    other definition than torch.randn under the derived seed, so this identity is its contract."""
    p, dev = path
    s = dm.cosine_schedule(100)
    (x0,), _ = make(shape, torch.float32, dev, 1)
    for t in (17, torch.arange(shape[0]) * 7 % 100):
        t = t.to(dev) if isinstance(t, torch.Tensor) else t
        a = K.q_sample(s, x0, t, seed=123, offset=offset)
        b = K.q_sample(s, x0, t, noise=K.randn(shape, 123, offset, device=dev))
        if p == "triton":
            assert torch.equal(a, b)  # same arithmetic, noise from registers or from memory
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_and_kernel_agree_with_explicit_noise(triton_path, dtype, monkeypatch):
    s = dm.linear_schedule(1000)
    (x0, noise), _ = make((4, 3, 33), dtype, triton_path, 2, 2)
    t = torch.tensor([0, 1, 500, 999], device=triton_path)
    a = K.q_sample(s, x0, t, noise=noise)
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    b = K.q_sample(s, x0.cpu(), t.cpu(), noise=noise.cpu())
    eps32 = torch.finfo(dtype).eps
    assert (a.cpu().float() - b.float()).abs().max() <= 2 * eps32 * (1 + b.float().abs().max())


def test_non_contiguous_inputs(path):
    _, dev = path
    s = dm.linear_schedule(50)
    (base, nbase), _ = make((6, 5, 8), torch.float32, dev, 3, 2)
    x0, noise = base.transpose(1, 2)[::2], nbase.transpose(1, 2)[1::2]  # (3, 8, 5) each
    assert not x0.is_contiguous() and not noise.is_contiguous()
    t = torch.tensor([1, 20, 49], device=dev)
    a = K.q_sample(s, x0, t, noise=noise)
    b = K.q_sample(s, x0.contiguous(), t, noise=noise.contiguous())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(K.q_sample(s, x0, t, seed=4), K.q_sample(s, x0.contiguous(), t, seed=4))


def test_zero_size_and_scalar_shapes(path):
    _, dev = path
    s = dm.linear_schedule(10)
    x0 = torch.zeros(0, 3, device=dev)
    assert K.q_sample(s, x0, 3, seed=1).shape == (0, 3)
    out = K.q_sample(s, torch.ones((), device=dev), 3, noise=torch.zeros((), device=dev))
    assert out.shape == () and abs(out.item() - float(np.sqrt(np.prod(1 - s.betas[:4])))) < 1e-6


def test_device_tables_are_cached_and_released(path):
    _, dev = path
    s = dm.linear_schedule(30)
    x0 = torch.ones(2, 3, device=dev)
    K.q_sample(s, x0, torch.tensor([1, 2], device=dev), seed=0)
    entries = _PER_SCHEDULE[s]
    assert any(k[0] == "q" and k[1] == torch.device(dev) for k in entries)
    tab = next(v for k, v in entries.items() if k[0] == "q")
    K.q_sample(s, x0, torch.tensor([3, 4], device=dev), seed=0)
    assert next(v for k, v in _PER_SCHEDULE[s].items() if k[0] == "q") is tab  # built once
    alive = weakref.ref(s)
    del s, entries, tab
    gc.collect()
    assert alive() is None  # the cached tables hold no reference to their schedule


def test_t_on_another_device_is_moved(path):
    """A CPU index tensor works for inputs on any device (moved like the core's gather)."""
    _, dev = path
    s = dm.linear_schedule(30)
    x0 = torch.ones(2, 3, device=dev)
    a = K.q_sample(s, x0, torch.tensor([1, 2]), seed=0)
    b = K.q_sample(s, x0, torch.tensor([1, 2], device=dev), seed=0)
    assert torch.equal(a, b)
