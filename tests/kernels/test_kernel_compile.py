"""The kernels compile for NVIDIA GPUs (sm_80, sm_90) with no GPU present, and the compiled code
has the shape the design relies on: 16-byte vector loads/stores for float32 tiles, no layout
conversions through shared memory in the elementwise kernels, and the hardware approximations
in Box-Muller. (The interpreter accepts code that the GPU compiler rejects, e.g. annotated
globals; this catches that here.)"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "_compile_check.py")
    r = subprocess.run([sys.executable, script, "80", "90"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def test_every_variant_compiles(compiled):
    assert len(compiled) == 2 * 9


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_float32_tiles_are_vectorised(compiled, arch):
    for name in ("q_sample_table_philox", "step_scalar_philox", "loss_rows0", "loss_rows1"):
        c = compiled[f"{arch}/{name}"]
        assert "ld.global.v4.b32" in c["ld"], (name, c)
    for name in ("q_sample_table_philox", "step_scalar_philox"):
        c = compiled[f"{arch}/{name}"]
        assert "ld.global.v4.b32" in c["ld"] and "st.global.v4.b32" in c["st"], (name, c)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_no_shared_memory_round_trips(compiled, arch):
    """Aligned tiles (offset % 4 == 0, and inner % 4 == 0 for per-sample rows) keep each
    Philox call's four lanes in one thread next to the data. (Unaligned tiles shift the noise
    through shared memory; the loss's final reduction uses it too.)"""
    for name, c in compiled.items():
        if name.startswith(arch) and "loss" not in name and "unaligned" not in name:
            assert c["convert_layout"] == 0 and c["shared"] == 0, (name, c)


def test_box_muller_uses_hardware_approximations(compiled):
    c = compiled["sm90/q_sample_table_philox"]
    assert {"lg2.approx.ftz.f32", "sin.approx.ftz.f32", "cos.approx.ftz.f32"} <= set(c["approx"])
