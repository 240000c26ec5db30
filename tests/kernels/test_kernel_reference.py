"""Each kernel against the torch reference that sits beside its wrapper (``<op>_reference``, the
verified core in float64), as in the Triton tutorials: on every dispatch path, with explicit
noise and with the stream's noise (``seed``), float32 within 1e-6 norm-wise.

The references themselves are the core functions, which tests/core/ and
tests/samplers/ check against scipy, mpmath and independent numpy; test_kernel_steps.py and
test_kernel_noising.py hold the kernels to independent float64 numpy references as well."""

import numpy as np
import pytest
import torch

import diffmath as dm
import diffmath.kernels as K
from diffmath.kernels.loss import simple_loss_reference
from diffmath.kernels.noising import q_sample_reference
from diffmath.kernels.samplers import (
    ddim_step_reference,
    ddpm_step_reference,
    euler_maruyama_step_reference,
    langevin_step_reference,
)
from diffmath.sde import VPSDE
from tests.kernels._kernel_strategies import make
from tests.reference._kernel_ref import rel_err

SHAPE = (3, 5, 7)  # 35 elements per sample: tails on every path, unaligned rows
S = dm.linear_schedule(1000)
T_BATCH = torch.tensor([0, 417, 999])
T_DDIM, T_PREV = torch.tensor([1, 417, 999]), torch.tensor([-1, 397, 979])  # the final step, and two of 50


def cases(dev):
    """(name, kernel call, reference call) pairs, each a function of (x, y, noise-kwargs)."""
    t, td, tp = T_BATCH.to(dev), T_DDIM.to(dev), T_PREV.to(dev)
    return [
        ("q_sample", lambda x, y, kw: K.q_sample(S, x, t, **kw), lambda x, y, kw: q_sample_reference(S, x, t, **kw)),
        (
            "ddpm_step",
            lambda x, y, kw: K.ddpm_step(S, x, t, y, **kw),
            lambda x, y, kw: ddpm_step_reference(S, x, t, y, **kw),
        ),
        (
            "ddpm_step_clip",
            lambda x, y, kw: K.ddpm_step(S, x, 417, y, clip_x0=1.0, variance="large", **kw),
            lambda x, y, kw: ddpm_step_reference(S, x, 417, y, clip_x0=1.0, variance="large", **kw),
        ),
        (
            "ddim_step",
            lambda x, y, kw: K.ddim_step(S, x, td, tp, y, eta=0.7, **kw),
            lambda x, y, kw: ddim_step_reference(S, x, td, tp, y, eta=0.7, **kw),
        ),
        (
            "euler_maruyama_step",
            lambda x, y, kw: K.euler_maruyama_step(VPSDE(), x, 0.5, -0.01, y, **kw),
            lambda x, y, kw: euler_maruyama_step_reference(VPSDE(), x, 0.5, -0.01, y, **kw),
        ),
        (
            "langevin_step",
            lambda x, y, kw: K.langevin_step(x, y, torch.tensor([0.1, 0.01, 1e-3], device=dev), **kw),
            lambda x, y, kw: langevin_step_reference(x, y, torch.tensor([0.1, 0.01, 1e-3], device=dev), **kw),
        ),
    ]


@pytest.mark.parametrize("noise_kind", ["noise", "seed"])
@pytest.mark.parametrize("i", range(6))
def test_kernel_matches_its_torch_reference(path, i, noise_kind):
    _, dev = path
    name, kernel, reference = cases(dev)[i]
    (x, y, z), _ = make(SHAPE, torch.float32, dev, seed=10 + i, n=3)
    kw = {"noise": z} if noise_kind == "noise" else {"seed": 1234 + i, "offset": 8 * i + 1}
    out = kernel(x, y, kw)
    ref = reference(x, y, kw)
    assert ref.dtype == out.dtype == torch.float32 and ref.shape == out.shape == x.shape, name
    assert rel_err(out.cpu().numpy(), ref.cpu().numpy()) <= 1e-6, name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_simple_loss_matches_its_torch_reference(path, reduction):
    _, dev = path
    (p,), _ = make(SHAPE, torch.float32, dev, seed=3)
    p1, p2 = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    out = K.simple_loss(p1, 99, 5, reduction=reduction)
    ref = simple_loss_reference(p2, 99, 5, reduction=reduction)
    assert rel_err(out.detach().cpu().numpy(), ref.detach().cpu().numpy()) <= 1e-6
    w = torch.arange(1.0, 1.0 + out.numel(), device=dev).reshape(out.shape)  # a non-uniform upstream gradient
    (g1,) = torch.autograd.grad((out * w).sum(), p1)
    (g2,) = torch.autograd.grad((ref * w).sum(), p2)
    assert rel_err(g1.cpu().numpy(), g2.cpu().numpy()) <= 1e-6


def test_references_sit_beside_their_wrappers():
    # the Triton-tutorial layout: each public update's module holds its torch reference
    import inspect

    for op in (K.q_sample, K.ddpm_step, K.ddim_step, K.euler_maruyama_step, K.langevin_step, K.simple_loss):
        module = inspect.getmodule(op)
        ref = getattr(module, f"{op.__name__}_reference")
        assert inspect.getmodule(ref) is module and np.all([op.__name__ in (ref.__doc__ or "")])
