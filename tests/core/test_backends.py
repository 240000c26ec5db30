"""The same inputs as numpy float64, torch float64 and torch float32 agree (float32 within
1e-6 relative norm-wise), half precisions keep their dtype (within 1e-2), and results keep
the input's kind and device."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffmath as dm
from diffmath import forward, gaussian, losses, posterior
from diffmath import parameterization as P

S = dm.cosine_schedule(1000)


def _cases():
    return {
        "q_sample": lambda x, y, t: forward.q_sample(S, x, t, y),
        "q_step_sample": lambda x, y, t: forward.q_step_sample(S, x, t, y),
        "q_mean": lambda x, y, t: forward.q_mean_variance(S, x, t)[0],
        "q_var": lambda x, y, t: forward.q_mean_variance(S, x, t)[1],
        "posterior_mean": lambda x, y, t: posterior.q_posterior_mean_variance(S, x, y, t)[0],
        "posterior_logvar": lambda x, y, t: posterior.q_posterior_mean_variance(S, x, y, t)[2],
        "posterior_mean_from_eps": lambda x, y, t: posterior.posterior_mean_from_eps(S, x, t, y),
        "x0_from_eps": lambda x, y, t: P.x0_from_eps(S, x, t, y),
        "eps_from_x0": lambda x, y, t: P.eps_from_x0(S, x, t, y),
        "v_from_x0_eps": lambda x, y, t: P.v_from_x0_eps(S, t, x, y),
        "x0_from_v": lambda x, y, t: P.x0_from_v(S, x, t, y),
        "eps_from_v": lambda x, y, t: P.eps_from_v(S, x, t, y),
        "score_from_eps": lambda x, y, t: P.score_from_eps(S, t, y),
        "learned_range": lambda x, y, t: losses.learned_range_log_variance(
            S, t, x.clip(-1, 1) if isinstance(x, np.ndarray) else x.clamp(-1, 1)
        ),
        "normal_kl": lambda x, y, t: gaussian.normal_kl(x, y * 0.1, y, x * 0.1),
        "normal_log_prob": lambda x, y, t: gaussian.normal_log_prob(x, y, x * 0.2),
    }


CASES = _cases()


def _rel(a, ref):
    a = np.asarray(a, dtype=np.float64)
    return np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300)


@pytest.mark.parametrize("name", sorted(CASES))
@given(B=st.sampled_from([1, 3, 7]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=5)
def test_numpy_torch_float64_float32_agree(name, B, seed):
    fn = CASES[name]
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((2, B, 3, 5))
    t = rng.integers(0, 1000, B)
    t[0] = 0
    if B > 1:
        t[-1] = 999
    ref = fn(x, y, t)
    assert isinstance(ref, np.ndarray) and ref.dtype == np.float64 and ref.shape == (B, 3, 5)
    t64 = torch.from_numpy(t)
    out64 = fn(torch.from_numpy(x), torch.from_numpy(y), t64)
    assert isinstance(out64, torch.Tensor) and out64.dtype == torch.float64
    assert _rel(out64.numpy(), ref) < 1e-13
    out32 = fn(torch.from_numpy(x).float(), torch.from_numpy(y).float(), t64)
    assert out32.dtype == torch.float32
    assert _rel(out32.numpy(), ref) < 1e-6
    np32 = fn(x.astype(np.float32), y.astype(np.float32), t)
    assert np32.dtype == np.float32 and _rel(np32, ref) < 1e-6
    for half in (torch.float16, torch.bfloat16):
        outh = fn(torch.from_numpy(x).to(half), torch.from_numpy(y).to(half), t64)
        assert outh.dtype == half
        # inputs are rounded to half precision too: compare with the float64 result on the rounded inputs
        xr, yr = torch.from_numpy(x).to(half).double().numpy(), torch.from_numpy(y).to(half).double().numpy()
        refh = fn(xr, yr, t)
        fits = np.abs(refh) < 6e4  # float16 overflows beyond 65504 (x0 at t = T-1 reaches ~1e5)
        assert _rel(outh.float().numpy()[fits], refh[fits]) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_stay_on_device():
    x = torch.randn(4, 3, device="cuda")
    t = torch.tensor([0, 1, 500, 999], device="cuda")
    noise = torch.randn_like(x)
    out = forward.q_sample(S, x, t, noise)
    assert out.device == x.device and out.dtype == x.dtype
    # the same float32 math as on the CPU, against the float64 CPU result
    ref = forward.q_sample(S, x.cpu().double(), t.cpu(), noise.cpu().double())
    assert _rel(out.cpu().double().numpy(), ref.numpy()) < 1e-6


def test_scalar_t_and_python_float_inputs():
    out = forward.q_sample(S, np.array([1.0, 2.0]), np.int64(5), np.zeros(2))
    assert out.shape == (2,)
    assert np.isscalar(float(gaussian.normal_kl(0.0, 0.0, 1.0, 0.0)))


def test_mixed_kinds_and_devices_are_rejected_clearly():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="noise must be a torch tensor like x0; got ndarray"):
        forward.q_sample(S, x, 1, np.zeros((2, 3)))
    with pytest.raises(TypeError, match="s must be a diffmath.schedules.Schedule"):
        forward.q_sample("linear", x, 1, x)
    with pytest.raises(TypeError, match="t must be an integer tensor of timestep indices; got dtype torch.float32"):
        forward.q_sample(S, x, torch.tensor([1.0, 2.0]), x)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(B,\)"):
        forward.q_sample(S, x, torch.zeros(2, 1, dtype=torch.long), x)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor; got dtype torch.int64"):
        forward.q_sample(S, torch.zeros(2, 3, dtype=torch.long), 1, x)


READS = {"score_from_eps": (1,), "learned_range": (0,), "q_mean": (0,), "q_var": (0,)}  # else both x and y


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("pos", [0, 1])
def test_complex_input_is_refused_not_cast_to_real(name, kind, pos):
    # a complex tensor cast to a real dtype silently loses its imaginary part (normal_kl did so):
    # every entry point refuses it with TypeError, whichever argument holds it
    if pos not in READS.get(name, (0, 1)):
        pytest.skip(f"{name} does not read argument {pos}")
    x = torch.randn(3, 4, dtype=torch.float64)
    args = [x, x * 0.5]
    args[pos] = torch.complex(args[pos], args[pos])
    if kind == "numpy":
        args = [a.numpy() for a in args]
    f = (
        CASES[name] if name != "learned_range" else (lambda x, y, t: losses.learned_range_log_variance(S, t, x))
    )  # no clamp
    with pytest.raises(TypeError, match="real|floating"):
        f(*args, np.array([0, 5, 999]))


def test_complex_scalars_and_sigmas_are_refused():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="sigma must hold real"):
        losses.dsm_loss(x, x, x, torch.tensor([1 + 1j, 1.0]))
    with pytest.raises(TypeError, match="sigma must hold real"):  # numpy compared complex by real part, then cast
        losses.dsm_loss(x.numpy(), x.numpy(), x.numpy(), np.array([1 + 1j, 1.0]))
    with pytest.raises(TypeError, match="mean1 must be a real"):
        gaussian.normal_kl(1j, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="x_t must hold floating-point values"):
        P.x0_from_eps(S, [[1j]], 1, [[1.0]])
