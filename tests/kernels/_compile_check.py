"""Compile every kernel variant for NVIDIA GPUs without a GPU (Triton's bundled ptxas) and report
what the compiler made of it, as JSON on stdout. Run in a fresh process without
TRITON_INTERPRET (tests/kernels/test_kernel_compile.py does that)."""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from diffmath.kernels._affine import affine_kernel  # noqa: E402
from diffmath.kernels.loss import sq_err_kernel  # noqa: E402

AFFINE_SIG = {
    "x_ptr": "*{d}", "y_ptr": "*{d}", "z_ptr": "*{d}", "out_ptr": "*{d}", "coef_ptr": "*fp32", "t_ptr": "*i64",
    "ca": "fp32", "cb": "fp32", "cc": "fp32", "cp": "fp32", "cq": "fp32", "clip": "fp32",
    "inner": "i32", "coef_stride": "i32", "seed_lo": "i32", "seed_hi": "i32", "offset": "i64",
}  # fmt: skip
AFFINE_CONST = ["HAS_X", "HAS_Y", "NOISE", "CLIP", "COEF", "ROWS", "ALIGNED", "BLOCK", "FAST"]

# name -> (dtype, constexprs): the variants the public functions launch.
VARIANTS = {
    "q_sample_table_philox": ("fp32", dict(HAS_X=1, HAS_Y=0, NOISE=2, CLIP=0, COEF=2, ROWS=1, ALIGNED=1)),
    "q_sample_scalar_noise": ("bf16", dict(HAS_X=1, HAS_Y=0, NOISE=1, CLIP=0, COEF=0, ROWS=0, ALIGNED=1)),
    "ddpm_clip_table_philox": ("fp16", dict(HAS_X=1, HAS_Y=1, NOISE=2, CLIP=1, COEF=2, ROWS=1, ALIGNED=1)),
    "ddim_rows_philox_unaligned": ("fp32", dict(HAS_X=1, HAS_Y=1, NOISE=2, CLIP=0, COEF=1, ROWS=1, ALIGNED=0)),
    "step_scalar_philox": ("fp32", dict(HAS_X=1, HAS_Y=1, NOISE=2, CLIP=0, COEF=0, ROWS=0, ALIGNED=1)),
    "randn": ("fp32", dict(HAS_X=0, HAS_Y=0, NOISE=2, CLIP=0, COEF=0, ROWS=0, ALIGNED=1)),
}


def stats(ck):
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    return {
        "ld": sorted(set(re.findall(r"ld\.global[\.\w]*", ptx))),
        "st": sorted(set(re.findall(r"st\.global[\.\w]*", ptx))),
        "convert_layout": ttgir.count("convert_layout"),
        "shared": int(ck.metadata.shared),
        "approx": sorted(set(re.findall(r"(?:sin|cos|lg2)\.approx[\.\w]*", ptx))),
    }


def main():
    out = {}
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, (dtype, cx) in VARIANTS.items():
            sig = {k: v.format(d=dtype) for k, v in AFFINE_SIG.items()}
            sig.update({k: "constexpr" for k in AFFINE_CONST})
            consts = dict(cx, BLOCK=512, FAST=True)
            attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
            attrs[(12,)] = [["tt.divisibility", 16]]  # inner % 16 == 0, as for image batches
            ck = triton.compile(
                ASTSource(fn=affine_kernel, signature=sig, constexprs=consts, attrs=attrs), target=target
            )
            out[f"sm{arch}/{name}"] = stats(ck)
        sig = {"p_ptr": "*fp32", "part_ptr": "*fp32", "inner": "i32", "n_chunks": "i32", "seed_lo": "i32",
               "seed_hi": "i32", "offset": "i64", "ROWS": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr",
               "FAST": "constexpr"}  # fmt: skip
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
        for rows, aligned in ((0, 1), (1, 1), (1, 0)):
            consts = dict(ROWS=rows, ALIGNED=aligned, BLOCK=512, FAST=True)
            ck = triton.compile(
                ASTSource(fn=sq_err_kernel, signature=sig, constexprs=consts, attrs=attrs), target=target
            )
            out[f"sm{arch}/loss_rows{rows}{'' if aligned else '_unaligned'}"] = stats(ck)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
