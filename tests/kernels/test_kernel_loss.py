"""simple_loss(eps_pred, seed, offset): forward and backward against torch.nn.functional.mse_loss
with the regenerated eps, gradcheck in float64 (torch path), and the regeneration contract:
the eps it uses is exactly the eps q_sample drew with the same (seed, offset)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffmath as dm
import diffmath.kernels as K
from tests.kernels._kernel_strategies import DTYPES, KSET, make, shapes


@settings(KSET, max_examples=20)
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40))
def test_forward_backward_match_mse_loss(path, shape, dtype, seed, offset):
    _, dev = path
    (pred,), _ = make(shape, dtype, dev, seed % 2**32)
    eps = K.randn(shape, seed, offset, device=dev)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for reduction in ("mean", "none"):
        p1 = pred.clone().requires_grad_(True)
        loss = K.simple_loss(p1, seed, offset, reduction=reduction)
        p2 = pred.clone().float().requires_grad_(True)
        ref = F.mse_loss(p2, eps, reduction="none")
        ref = ref.mean() if reduction == "mean" else ref.reshape(shape[0], -1).mean(1)
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert (loss - ref).norm() <= 1e-6 * ref.norm()  # eps identical, sums in float32/float64
        w = torch.linspace(0.5, 1.5, ref.numel(), device=dev).reshape(ref.shape)
        (loss * w).sum().backward()
        (ref * w).sum().backward()
        assert p1.grad.dtype == dtype
        g, gr = p1.grad.float(), p2.grad
        assert (g - gr).norm() <= tol * gr.norm()


def test_regenerates_q_sample_eps_exactly(path):
    """With eps_pred equal to the drawn eps, the loss and its gradient are exactly zero; with
    eps_pred = 0 the loss is the mean square of the eps that q_sample used."""
    _, dev = path
    s = dm.linear_schedule(1000)
    shape, seed, offset = (3, 4, 5, 7), 42, 2**33 + 5
    x0 = torch.zeros(shape, device=dev)
    t = torch.full((3,), 999, device=dev)
    eps = K.randn(shape, seed, offset, device=dev)
    x_t = K.q_sample(s, x0, t, seed=seed, offset=offset)
    torch.testing.assert_close(x_t, eps * float(s.sqrt_one_minus_alphas_cumprod[999]), rtol=1e-6, atol=0)
    p = eps.clone().requires_grad_(True)
    loss = K.simple_loss(p, seed, offset)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(p.grad) == 0
    assert K.simple_loss(eps, seed, offset, reduction="none").abs().max().item() == 0.0
    z = torch.zeros(shape, device=dev)
    torch.testing.assert_close(K.simple_loss(z, seed, offset), eps.square().mean(), rtol=1e-6, atol=0)


def test_gradcheck_float64(torch_path):
    for reduction in ("mean", "none"):
        p = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q: K.simple_loss(q, 7, 3, reduction=reduction), (p,))


def test_float64_matches_core_loss(torch_path):
    p = torch.randn(4, 9, dtype=torch.float64)
    eps = K.randn((4, 9), 11, 0, dtype=torch.float64)
    for reduction in ("mean", "none"):
        core = dm.losses.simple_loss(eps, p, reduction=reduction)
        torch.testing.assert_close(K.simple_loss(p, 11, 0, reduction=reduction), core, rtol=1e-14, atol=0)


def test_loss_over_chunks_and_rows(path):
    """Rows longer than a tile (2051 > 2048 elements) with an unaligned offset."""
    _, dev = path
    (pred,), _ = make((3, 2051), torch.float32, dev, 0)
    eps = K.randn((3, 2051), 5, 3, device=dev)
    ref = (pred - eps).square().mean(1)
    torch.testing.assert_close(K.simple_loss(pred, 5, 3, reduction="none"), ref, rtol=1e-6, atol=0)


def test_bad_arguments(path):
    _, dev = path
    p = torch.randn(2, 3, device=dev)
    with pytest.raises(ValueError, match="seed must be the int given to q_sample"):
        K.simple_loss(p, None)
    with pytest.raises(ValueError, match="reduction"):
        K.simple_loss(p, 1, reduction="sum")
    with pytest.raises(ValueError, match="seed must lie in"):
        K.simple_loss(p, -1)
    with pytest.raises(TypeError, match="seed must be an integer"):
        K.simple_loss(p, 1.5)
    with pytest.raises(TypeError, match="eps_pred must be a floating-point tensor; got dtype torch.int32"):
        K.simple_loss(torch.ones(2, 3, dtype=torch.int32, device=dev), 1)
