#!/usr/bin/env bash
# The GPU column of benchmarks/RESULTS.md in few calls on a lent CUDA machine.
#
# The lent machine (this workplace's 'cuda' image: python3 with torch, triton, scipy, pytest,
# hypothesis, pytest-xdist, pytest-benchmark, matplotlib, safetensors, scikit-learn) reaches no
# network and lacks diffusers, the benchmark's peer. So, here, once:
#
#     bash benchmarks/gpu_session.sh fetch        # diffusers + importlib_metadata wheels -> .whl/
#
# then, through the device tool, one call per group of stages (each group ends inside 600 s):
#
#     bash benchmarks/gpu_session.sh env tests roofline      (carry: .whl)
#     bash benchmarks/gpu_session.sh bench                   (carry: .whl)
#     bash benchmarks/gpu_session.sh pytest-bench demo       (carry: .whl)
#
# Stages:
#   env           device, driver, torch / triton versions, copy bandwidth is in roofline
#   tests         the whole test suite on the GPU (kernel tests run the compiled Triton path,
#                 TRITON_INTERPRET unset; the CUDA-only tests run instead of skipping)
#   roofline      benchmarks/roofline.py: % of measured copy bandwidth at 2^24 and 2^26 elements
#   bench         python -m diffmath bench: kernel / fallback / eager / torch.compile / diffusers
#   pytest-bench  pytest benchmarks --benchmark-only (JSON saved)
#   demo          the demo recipe trained on CUDA (bf16 autocast), sampled and evaluated
#
# Every stage's log and files go to $OUT/<stage>/ ($OUT is set by the device tool; elsewhere
# ./gpu-session/). The repository is not installed: a copy of it in /tmp with
# diffmath/kernels -> kernels (what setuptools' package-dir does) goes first on PYTHONPATH.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-session}
PY=${PYTHON:-python3}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
IMPORTLIB_METADATA_VERSION=${IMPORTLIB_METADATA_VERSION:-10.2.0}

fetch() {
    cd "$ROOT" || exit 1
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl "diffusers==$DIFFUSERS_VERSION" "importlib_metadata==$IMPORTLIB_METADATA_VERSION"
    ls -l .whl
}

setup() {
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$ROOT"/.whl/*.whl || exit 1
    else
        echo "no .whl/ here: the diffusers column will be empty (run 'gpu_session.sh fetch' here and carry .whl)"
    fi
    SRC=/tmp/diffmath-src
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -r "$ROOT"/diffmath "$ROOT"/kernels "$ROOT"/tests "$ROOT"/benchmarks "$ROOT"/pyproject.toml \
        "$ROOT"/README.md "$ROOT"/docs "$SRC"/ || exit 1
    ln -s ../kernels "$SRC/diffmath/kernels"
    export PYTHONPATH="$SRC:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    unset TRITON_INTERPRET
    cd "$SRC" || exit 1
    "$PY" -c "import diffmath, diffmath.kernels" || exit 1
}

# run STAGE SECONDS CMD...: the command's output to the screen and $OUT/STAGE/log.
run() {
    local stage=$1 limit=$2
    shift 2
    mkdir -p "$OUT/$stage"
    echo "=== $stage ($(date -u +%FT%TZ), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$stage/log"
    local rc=${PIPESTATUS[0]}
    echo "=== $stage exit $rc"
    return 0
}

stage_env() {
    run env 60 bash -c "nvidia-smi; $PY - <<'EOF'
import platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__, '| triton', triton.__version__)
p = torch.cuda.get_device_properties(0)
print(p.name, '|', p.multi_processor_count, 'SMs |', round(p.total_memory / 2**30, 1), 'GiB')
try:
    import diffusers
    print('diffusers', diffusers.__version__)
except Exception as e:
    print('diffusers missing:', e)
EOF"
}

stage_tests() {
    run tests 420 "$PY" -m pytest -q -n 8 -p no:cacheprovider tests --junitxml="$OUT/tests/junit.xml"
}

stage_roofline() {
    run roofline 240 "$PY" benchmarks/roofline.py --log2n 24 26 --dtype float32 bfloat16
}

stage_bench() {
    run bench 560 "$PY" -m diffmath bench
}

stage_pytest_bench() {
    run pytest-bench 400 "$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
        --benchmark-group-by=group --benchmark-json="$OUT/pytest-bench/bench.json"
}

stage_demo() {
    run demo 400 "$PY" -m diffmath demo --device cuda --out "$OUT/demo/run" --overwrite --no-progress
}

[ $# -gt 0 ] || { sed -n 2,26p "$0"; exit 2; }
for s in "$@"; do
    case $s in
        fetch) fetch ;;
        env | tests | roofline | bench | pytest-bench | demo) ;;
        *) echo "unknown stage '$s' (fetch, env, tests, roofline, bench, pytest-bench, demo)"; exit 2 ;;
    esac
done
[ "$*" = fetch ] && exit 0
setup
for s in "$@"; do
    case $s in
        env) stage_env ;;
        tests) stage_tests ;;
        roofline) stage_roofline ;;
        bench) stage_bench ;;
        pytest-bench) stage_pytest_bench ;;
        demo) stage_demo ;;
    esac
done
