"""Dispatch (DIFFMATH_KERNELS), and clear errors for bad input, on every path."""

import gc
import weakref

import numpy as np
import pytest
import torch

import diffmath as dm
import diffmath.kernels as K
from diffmath._array import _PER_SCHEDULE
from diffmath.kernels import _common

S = dm.linear_schedule(100)


def test_env_var_selects_the_path(monkeypatch):
    x = torch.ones(2, 3)
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    assert not K.use_triton(x)
    monkeypatch.setenv("DIFFMATH_KERNELS", "auto")
    assert not K.use_triton(x)  # auto: Triton only for CUDA tensors
    assert not K.use_triton(x.double())
    monkeypatch.setenv("DIFFMATH_KERNELS", "gpu")
    with pytest.raises(ValueError, match="DIFFMATH_KERNELS must be one of auto, triton, torch; got 'gpu'"):
        K.q_sample(S, x, 1, seed=0)


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("DIFFMATH_KERNELS", "triton")
    monkeypatch.setattr(_common, "interpreting", lambda kernel: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.q_sample(S, torch.ones(2, 3), 1, seed=0)


def test_forced_triton_rejects_float64(monkeypatch):
    if not _common.HAVE_TRITON:
        pytest.skip("no triton")
    monkeypatch.setenv("DIFFMATH_KERNELS", "triton")
    with pytest.raises(TypeError, match="float64 runs on the torch path"):
        K.q_sample(S, torch.ones(2, 3, dtype=torch.float64), 1, seed=0)


def test_without_triton(monkeypatch):
    monkeypatch.setattr(_common, "HAVE_TRITON", False)
    monkeypatch.setenv("DIFFMATH_KERNELS", "auto")
    assert not K.use_triton(torch.ones(1))
    assert K.q_sample(S, torch.ones(2, 3), 1, seed=0).shape == (2, 3)
    monkeypatch.setenv("DIFFMATH_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.q_sample(S, torch.ones(2, 3), 1, seed=0)


def test_bad_tensors(path):
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match="eps is on meta but x_t is on"):
        K.ddpm_step(S, x, 5, torch.ones(2, 3, device="meta"), seed=0)
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(2, 3\); got \(2, 4\)"):
        K.q_sample(S, x, 5, noise=torch.ones(2, 4, device=dev))
    with pytest.raises(ValueError, match=r"score must have the shape of x \(2, 3\); got \(3, 2\)"):
        K.langevin_step(x, torch.ones(3, 2, device=dev), 0.1, seed=0)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor; got dtype torch.int64"):
        K.q_sample(S, torch.ones(2, 3, dtype=torch.long, device=dev), 5, seed=0)
    with pytest.raises(
        TypeError, match="x0 must be a float32, float16, bfloat16 or float64 tensor; got dtype torch.float8"
    ):
        K.q_sample(S, torch.ones(2, 3, device=dev).to(torch.float8_e4m3fn), 5, seed=0)
    with pytest.raises(TypeError, match="x0 must be a torch tensor; got ndarray"):
        K.q_sample(S, np.ones((2, 3), np.float32), 5, seed=0)
    with pytest.raises(ValueError, match="requires grad"):
        K.q_sample(S, torch.ones(2, 3, device=dev, requires_grad=True), 5, seed=0)
    with torch.no_grad():
        K.q_sample(S, torch.ones(2, 3, device=dev, requires_grad=True), 5, seed=0)
    with pytest.raises(TypeError, match="s must be a diffmath.schedules.Schedule"):
        K.q_sample(None, x, 5, seed=0)


def _error(fn):
    with pytest.raises((TypeError, ValueError)) as e:
        fn()
    return type(e.value), str(e.value)


X = torch.ones(2, 3)
#: (kernel call, core call) pairs given the same bad input; the kernels validate it with the
#: core's checks (diffmath._array, diffmath.samplers), so the errors are the same.
SAME_ERRORS = {
    "t too large": (lambda: K.q_sample(S, X, 100, seed=0), lambda: dm.forward.q_sample(S, X, 100, X)),
    "t negative in a batch": (
        lambda: K.q_sample(S, X, torch.tensor([3, -1]), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.tensor([3, -1]), X),
    ),
    "float t": (
        lambda: K.q_sample(S, X, torch.tensor([3.0, 1.0]), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.tensor([3.0, 1.0]), X),
    ),
    "float numpy t": (
        lambda: K.q_sample(S, X, np.array([3.0, 1.0]), seed=0),
        lambda: dm.forward.q_sample(S, X, np.array([3.0, 1.0]), X),
    ),
    "python float t": (lambda: K.q_sample(S, X, 3.0, seed=0), lambda: dm.forward.q_sample(S, X, 3.0, X)),
    "bool t": (lambda: K.q_sample(S, X, True, seed=0), lambda: dm.forward.q_sample(S, X, True, X)),
    "bool tensor t": (
        lambda: K.q_sample(S, X, torch.tensor([True, False]), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.tensor([True, False]), X),
    ),
    "2-d t": (
        lambda: K.q_sample(S, X, torch.ones(2, 1, dtype=torch.long), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.ones(2, 1, dtype=torch.long), X),
    ),
    "t batch": (
        lambda: K.q_sample(S, X, torch.tensor([3, 1, 2]), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.tensor([3, 1, 2]), X),
    ),
    "0-d t out of range": (
        lambda: K.q_sample(S, X, torch.tensor(-4), seed=0),
        lambda: dm.forward.q_sample(S, X, torch.tensor(-4), X),
    ),
    "t_prev": (lambda: K.ddim_step(S, X, 5, -2, X), lambda: dm.samplers.ddim_step(S, X, 5, -2, X)),
    "integer x": (
        lambda: K.q_sample(S, X.long(), 5, seed=0),
        lambda: dm.forward.q_sample(S, X.long(), 5, X),
    ),
    "not an array": (lambda: K.q_sample(S, None, 5, seed=0), lambda: dm.forward.q_sample(S, None, 5, X)),
    "integer eps": (
        lambda: K.ddpm_step(S, X, 5, X.long(), seed=0),
        lambda: dm.samplers.ddpm_step(S, X, 5, X.long(), X),
    ),
    "eps shape": (
        lambda: K.ddpm_step(S, X, 5, torch.ones(3, 2), seed=0),
        lambda: dm.samplers.ddpm_step(S, X, 5, torch.ones(3, 2), X),
    ),
    "eps device": (
        lambda: K.ddpm_step(S, X, 5, torch.ones(2, 3, device="meta"), seed=0),
        lambda: dm.samplers.ddpm_step(S, X, 5, torch.ones(2, 3, device="meta"), X),
    ),
    "numpy noise": (
        lambda: K.q_sample(S, X, 5, noise=np.ones((2, 3))),
        lambda: dm.forward.q_sample(S, X, 5, np.ones((2, 3))),
    ),
    "step_size 0": (lambda: K.langevin_step(X, X, 0.0, seed=0), lambda: dm.samplers.langevin_step(X, X, 0.0, X)),
    "step_size nan": (
        lambda: K.langevin_step(X, X, float("nan"), seed=0),
        lambda: dm.samplers.langevin_step(X, X, float("nan"), X),
    ),
    "step_size bool": (lambda: K.langevin_step(X, X, True, seed=0), lambda: dm.samplers.langevin_step(X, X, True, X)),
    "step_size str": (lambda: K.langevin_step(X, X, "0.1", seed=0), lambda: dm.samplers.langevin_step(X, X, "0.1", X)),
    "step_size array": (
        lambda: K.langevin_step(X, X, np.array([0.1, -1.0]), seed=0),
        lambda: dm.samplers.langevin_step(X, X, np.array([0.1, -1.0]), X),
    ),
    "step_size shape": (
        lambda: K.langevin_step(X, X, np.ones(3), seed=0),
        lambda: dm.samplers.langevin_step(X, X, np.ones(3), X),
    ),
    "eta": (
        lambda: K.ddim_step(S, X, 5, 4, X, eta=-0.1, seed=0),
        lambda: dm.samplers.ddim_step(S, X, 5, 4, X, X, eta=-0.1),
    ),
    "clip_x0": (
        lambda: K.ddpm_step(S, X, 5, X, seed=0, clip_x0=-1.0),
        lambda: dm.samplers.ddpm_step(S, X, 5, X, X, clip_x0=-1.0),
    ),
}


@pytest.mark.parametrize("case", sorted(SAME_ERRORS))
def test_errors_match_the_core(torch_path, case):
    """Bad input gets the same exception type and message from a kernel as from the core."""
    kernel, core = SAME_ERRORS[case]
    assert _error(kernel) == _error(core)


def test_indices_the_core_accepts_are_converted(path):
    """Integer numpy arrays, lists and 0-d tensors (valid for the core's check_t) work as t."""
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    ref = K.q_sample(S, x, torch.tensor([3, 7], device=dev), seed=0)
    for t in (np.array([3, 7]), [3, 7], torch.tensor([3, 7], dtype=torch.int16)):
        assert torch.equal(K.q_sample(S, x, t, seed=0), ref)
    assert torch.equal(K.q_sample(S, x, torch.tensor(3), seed=0), K.q_sample(S, x, 3, seed=0))


def test_bad_timesteps(path):
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\) for a schedule of 100 steps; got t = 100"):
        K.q_sample(S, x, 100, seed=0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\).*got t = -1"):
        K.q_sample(S, x, torch.tensor([3, -1], device=dev), seed=0)
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        K.q_sample(S, x, torch.tensor([3.0, 1.0]), seed=0)
    with pytest.raises(ValueError, match="a batch of 3 timesteps t must match the batch of x"):
        K.q_sample(S, x, torch.tensor([3, 1, 2]), seed=0)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 100\)"):
        K.ddim_step(S, x, 5, -2, x)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        K.ddim_step(S, x, 5, torch.tensor([4, 5]), x)


def test_bad_noise_arguments(path):
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(
        ValueError, match=r"pass seed=<int in \[0, 2\*\*64\)> to draw it in the kernel .* or noise=<tensor"
    ):
        K.q_sample(S, x, 5)
    with pytest.raises(ValueError, match="either noise= .* or seed="):
        K.q_sample(S, x, 5, seed=1, noise=x)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 18446744073709551616\); got seed = -3"):
        K.langevin_step(x, x, 0.1, seed=-3)
    with pytest.raises(ValueError, match="seed must lie in"):
        K.langevin_step(x, x, 0.1, seed=2**64)
    with pytest.raises(TypeError, match="seed must be an integer"):
        K.langevin_step(x, x, 0.1, seed=True)
    with pytest.raises(ValueError, match="offset must lie in"):
        K.langevin_step(x, x, 0.1, seed=1, offset=-1)
    with pytest.raises(ValueError, match="seed must lie in"):
        K.randn((3,), -1)


def test_bad_step_parameters(path):
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match="variance must be 'small'"):
        K.ddpm_step(S, x, 5, x, seed=0, variance="learned")
    with pytest.raises(ValueError, match="clip_x0 must be None or a finite float > 0; got clip_x0 = -1.0"):
        K.ddpm_step(S, x, 5, x, seed=0, clip_x0=-1.0)
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        K.ddim_step(S, x, 5, 4, x, eta=-0.1, seed=0)
    with pytest.raises(ValueError, match="eta = 3.0 makes sigma"):
        K.ddim_step(S, x, 50, 20, x, eta=3.0, seed=0)
    with pytest.raises(ValueError, match="step_size must be finite and > 0; got step_size = 0.0"):
        K.langevin_step(x, x, 0.0, seed=0)
    with pytest.raises(ValueError, match=r"step_size must be a float or have shape \(B,\) = \(2,\)"):
        K.langevin_step(x, x, torch.ones(3), seed=0)


def test_bad_sde_arguments(path):
    sde = pytest.importorskip("diffmath.sde").VPSDE()
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match="dt must be < 0"):
        K.euler_maruyama_step(sde, x, 0.5, 0.01, x, seed=0)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\] \(SDE time, T = 1\); got t = 0.0"):
        K.euler_maruyama_step(sde, x, 0.0, -0.01, x, seed=0)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        K.euler_maruyama_step(sde, x, torch.tensor([0.5, 1.5]), -0.01, x, seed=0)
    with pytest.raises(ValueError, match="t \\+ dt must stay >= 0"):
        K.euler_maruyama_step(sde, x, 0.005, -0.01, x, seed=0)
    with pytest.raises(TypeError, match="sde must be a forward SDE with linear_drift_coef"):
        K.euler_maruyama_step(object(), x, 0.5, -0.01, x, seed=0)
    with pytest.raises(ValueError, match=r"a batch of times t must have shape \(B,\) = \(2,\)"):
        K.euler_maruyama_step(sde, x, torch.tensor([0.5, 0.6, 0.7]), -0.01, x, seed=0)


def test_schedule_table_moves_to_the_tensor_device(path):
    """Tables live as float64 numpy on the host; the first call on a device builds the float32
    (or float64) copy there, later calls reuse it."""
    _, dev = path
    s = dm.cosine_schedule(20)
    x = torch.ones(2, 3, device=dev)
    out = K.ddpm_step(s, x, torch.tensor([3, 4], device=dev), x, seed=1)
    assert out.device == x.device
    keys = [k for k in _PER_SCHEDULE[s] if k[1] == x.device]
    assert keys and all(_PER_SCHEDULE[s][k].device == x.device for k in keys)


def test_zero_terminal_snr_step_is_refused(path):
    """At abar_t = 0 the eps-prediction steps divide by zero: a clear error, not NaN."""
    _, dev = path
    s = dm.rescale_zero_terminal_snr(dm.linear_schedule(100))
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match="t = 99 has alphas_cumprod"):
        K.ddpm_step(s, x, 99, x, seed=0)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        K.ddpm_step(s, x, torch.tensor([5, 99], device=dev), x, seed=0)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        K.ddim_step(s, x, torch.tensor([99, 50], device=dev), 40, x)
    assert torch.isfinite(K.ddpm_step(s, x, 98, x, seed=0)).all()


def test_philox_active_is_public_and_follows_the_env(monkeypatch):
    import diffmath.kernels as K

    x = torch.zeros(4)
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    assert K.philox_active(x) is False
    monkeypatch.setenv("DIFFMATH_KERNELS", "auto")
    assert K.philox_active(x) is (x.is_cuda and K.use_triton(x))


def test_ddim_fold_validates_like_the_core():
    """ddim_fold is built on diffmath.samplers.ddim.ddim_coefs: bad indices raise, never wrap."""
    from diffmath.kernels.samplers import ddim_fold

    with pytest.raises(ValueError, match="t_prev must be < t"):
        ddim_fold(S, 5, 7, 0.0)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        ddim_fold(S, 5, 5, 0.0)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        ddim_fold(S, np.array([5, 6]), np.array([4, 6]), 0.0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 100\).*got t = -1"):
        ddim_fold(S, -1, -1, 0.0)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 100\).*got t_prev = -3"):
        ddim_fold(S, 5, -3, 0.0)
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        ddim_fold(S, 5, 4, -1.0)
    c_x, c_eps, sigma = ddim_fold(S, 50, -1, 0.0)
    assert np.isclose(c_x, S.sqrt_recip_alphas_cumprod[50]) and sigma == 0.0


def test_oversized_coefficients_are_refused(path):
    """Coefficients that overflow float32 raise a ValueError naming the argument, not inf/NaN."""
    _, dev = path
    x = torch.ones(2, 3, device=dev)
    with pytest.raises(ValueError, match="step_size gives a step coefficient .* not finite in float32"):
        K.langevin_step(x, x, 1e300, seed=1)
    with pytest.raises(ValueError, match="step_size gives a step coefficient .* not finite in float32"):
        K.langevin_step(x, x, torch.tensor([0.1, 1e300], dtype=torch.float64), seed=1)
    vesde = (
        dm.sde.VESDE(sigma_max=1e30)
        if hasattr(dm, "sde")
        else pytest.importorskip("diffmath.sde").VESDE(sigma_max=1e30)
    )
    with pytest.raises(ValueError, match=r"sde .* with dt gives a step coefficient .* not finite in float32"):
        K.euler_maruyama_step(vesde, x, 0.9, -0.01, x, seed=1)
    with pytest.raises(ValueError, match=r"sde .* with dt gives a step coefficient"):
        K.euler_maruyama_step(vesde, x, torch.tensor([0.9, 0.5]), -0.01, x, seed=1)
    assert torch.isfinite(K.langevin_step(x, x, 1e-3, seed=1)).all()


def test_gathered_coefficients_that_overflow_float32_are_refused(path):
    """DDPM with a tensor t gathers its coefficients in the kernel from float32 tables: a value
    finite in float64 but beyond float32's range (here 1/sqrt(abar_t) ~ 1e40 for abar_t ~ 1e-80,
    used by clip_x0) must be refused like a host-folded one, not turned into inf/NaN output."""
    _, dev = path
    s = dm.schedules.Schedule.from_betas(np.full(60, 0.99))  # abar_t = 0.01**(t+1)
    assert np.isfinite(s.sqrt_recip_alphas_cumprod).all() and s.sqrt_recip_alphas_cumprod[-1] > 1e40
    x = torch.ones(2, 3, device=dev)
    for t in (torch.tensor([1, 45], device=dev), 45):
        with pytest.raises(ValueError, match=r"s at t = 38 gives a step coefficient of .* not finite in float32"):
            K.ddpm_step(s, x, t, x, seed=0, clip_x0=1.0)
    assert torch.isfinite(K.ddpm_step(s, x, torch.tensor([1, 37], device=dev), x, seed=0, clip_x0=1.0)).all()
    assert torch.isfinite(K.ddpm_step(s, x, torch.tensor([1, 45], device=dev), x, seed=0)).all()  # folded: finite
    if path[0] == "torch":  # float64 data computes in float64 on the torch path, where the step is finite
        assert torch.isfinite(K.ddpm_step(s, x.double(), torch.tensor([1, 45]), x.double(), seed=0, clip_x0=1.0)).all()


def test_ddim_fold_is_cached_and_released_with_the_schedule(path):
    _, dev = path
    s = dm.cosine_schedule(40)
    x = torch.ones(2, 3, device=dev)
    a = K.ddim_step(s, x, 30, 20, x, eta=0.0)
    key = ("ddim_fold", 30, 20, 0.0)
    fold = _PER_SCHEDULE[s][key]
    assert torch.equal(K.ddim_step(s, x, 30, 20, x, eta=0.0), a) and _PER_SCHEDULE[s][key] is fold
    alive = weakref.ref(s)
    del s
    gc.collect()
    assert alive() is None  # the cache holds no reference to its schedule


def test_ddpm_tables_are_released_with_the_schedule(path):
    _, dev = path
    s = dm.cosine_schedule(40)
    x = torch.ones(2, 3, device=dev)
    K.ddpm_step(s, x, torch.tensor([3, 4], device=dev), x, seed=0, variance="large")
    K.ddpm_step(s, x, 5, x, seed=0, clip_x0=1.0)
    alive = weakref.ref(s)
    del s
    gc.collect()
    assert alive() is None  # the cache holds no reference to its schedule


# ----------------------------------------------------------------------------- the CPU chunked update
def test_chunk_bounds():
    from diffmath.kernels._affine import _chunk_bounds

    for n in (16, 17, 63, 64, 65, 79, 80, 81, 640, 655, 656, 1000):
        b = _chunk_bounds(n, 64)
        lengths = np.diff(b)
        assert b[0] == 0 and b[-1] == n and (lengths > 0).all()
        assert all(k % 64 == 0 for k in lengths[:-1]) and lengths[-1] >= min(n, 16)


def _one_call_and_chunked(monkeypatch, fn):
    from diffmath.kernels import _affine

    monkeypatch.setattr(_affine, "CPU_CHUNK_MIN", 1 << 62)
    ref = fn()
    monkeypatch.setattr(_affine, "CPU_CHUNK_MIN", 1)
    return ref, fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("extra", [0, 1, 15, 16, 17])
def test_cpu_chunked_update_is_bit_identical(monkeypatch, dtype, extra):
    """Large CPU updates with the stream's noise run in cache-sized chunks, the normals drawn
    chunk by chunk: the result must equal the one-call path bit for bit (same ops per element,
    and CPU normal_ gives the same numbers in chunks that are multiples of 16 long)."""
    from diffmath.kernels import _affine

    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    monkeypatch.setattr(_affine, "CPU_CHUNK", 64)
    s = dm.cosine_schedule(1000)
    g = torch.Generator().manual_seed(extra)
    x = torch.randn(3, 5 * 64 + extra, generator=g).to(dtype)
    e = torch.randn(x.shape, generator=g).to(dtype)
    xt = x.t().contiguous().t()  # non-contiguous, same values
    vp = dm.sde.VPSDE()
    cases = [
        lambda: K.q_sample(s, x, 300, seed=3, offset=7),
        lambda: K.ddpm_step(s, x, 500, e, seed=1, clip_x0=1.0),
        lambda: K.ddpm_step(s, xt, 500, e, seed=1, variance="large"),
        lambda: K.ddim_step(s, x, 501, 481, e, eta=1.0, seed=4),
        lambda: K.euler_maruyama_step(vp, x, 0.5, -0.01, e, seed=9),
        lambda: K.langevin_step(x, e, 0.01, seed=2),
    ]
    for fn in cases:
        ref, chunked = _one_call_and_chunked(monkeypatch, fn)
        assert chunked.dtype == ref.dtype and torch.equal(chunked, ref)


def test_cpu_chunked_stream_at_the_default_chunk(monkeypatch):
    """The same at the real sizes: 2^21 + 5 elements in chunks of CPU_CHUNK."""
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    s = dm.linear_schedule(1000)
    x = torch.zeros(2**21 + 5)  # q_sample of zeros is sqrt(1 - abar_t) times the stream's normals
    ref, chunked = _one_call_and_chunked(monkeypatch, lambda: K.q_sample(s, x, 999, seed=11, offset=3))
    assert torch.equal(chunked, ref)
    z = chunked / float(np.sqrt(-np.expm1(np.log1p(-s.betas).sum())))
    assert abs(z.mean().item()) < 5 / 2**10.5 and abs(z.var().item() - 1) < 0.01  # N(0, 1), 5 sigma
