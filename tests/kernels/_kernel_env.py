"""Which dispatch paths can run here (shared by conftest.py and the tests).

Without a GPU the Triton path runs in the Triton interpreter: TRITON_INTERPRET must be set
before triton (and diffmath.kernels) is first imported, so importing this module sets it.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: the device the Triton path runs on here, or None
TRITON_DEVICE = ("cuda" if HAS_CUDA else "cpu") if HAS_TRITON and (HAS_CUDA or INTERPRETING) else None

# (path, device) pairs: the Triton path where it can run here, the torch path on CPU (and CUDA).
PATHS = (
    ([("triton", TRITON_DEVICE)] if TRITON_DEVICE else [])
    + [("torch", "cpu")]
    + ([("torch", "cuda")] if HAS_CUDA else [])
)
