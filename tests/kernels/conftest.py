"""Fixtures for the kernel tests: each correctness test runs on every dispatch path that can
run here (the Triton path interpreted on CPU without a GPU, compiled on CUDA with one)."""

import pytest

from tests.kernels._kernel_env import PATHS, TRITON_DEVICE  # sets TRITON_INTERPRET first when there is no GPU


@pytest.fixture(params=PATHS, ids=[f"{p}-{d}" for p, d in PATHS])
def path(request, monkeypatch):
    """Force a dispatch path; returns (path, device)."""
    p, d = request.param
    monkeypatch.setenv("DIFFMATH_KERNELS", p)
    return p, d


@pytest.fixture
def triton_path(monkeypatch):
    """The Triton path on the device where it runs here (skips without one); returns the device."""
    if TRITON_DEVICE is None:
        pytest.skip("no Triton path here (needs a GPU or TRITON_INTERPRET=1)")
    monkeypatch.setenv("DIFFMATH_KERNELS", "triton")
    return TRITON_DEVICE


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("DIFFMATH_KERNELS", "torch")
    return "cpu"
