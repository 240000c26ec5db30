# Every target creates .venv and installs on first use; nothing else is assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The local CPU build here; override (e.g. TORCH_SPEC=torch) to bring your own torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# OpenMP threads that spin while waiting make 2-thread torch 4-9x slower on shared cores.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m diffmath demo

# Then the numerics tests again with numpy's AVX-512 group (X86_V4) disabled, and with its AVX2
# group (X86_V3) too: numpy picks its vectorised exp/log/expm1/log1p by CPU and they differ by an
# ulp or two, so a tolerance tighter than what the libm guarantees fails here on any machine
# (numpy ignores groups the CPU lacks). docs/numerics.md, "Tolerances".
NUMERICS_TESTS := tests/core/test_schedules.py tests/core/test_forward.py tests/core/test_posterior.py \
	tests/core/test_parameterization.py tests/core/test_gaussian.py tests/core/test_losses.py \
	tests/core/test_sde.py tests/core/test_oracle.py tests/core/test_likelihood.py tests/core/test_backends.py
NUMERICS_ARGS := -q -n $(PYTEST_WORKERS) -p no:cacheprovider -k "not diffusers_own" $(NUMERICS_TESTS)

test: $(STAMP) lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests
	NPY_DISABLE_CPU_FEATURES="X86_V4" $(PY) -m pytest $(NUMERICS_ARGS)
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4" $(PY) -m pytest $(NUMERICS_ARGS)

# ruff (lint rules and formatting) over the tree, then mypy over the math, the layers built on it
# and the kernels (pyproject.toml, [tool.mypy]). mypy cannot follow setuptools' editable import
# hook, so it reads kernels/ as diffmath.kernels through a tree of links, as the package-dir
# mapping installs it.
TYPECHECK := $(VENV)/typecheck
MYPY      := $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MYPY)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/diffmath
	ln -s $(CURDIR)/diffmath/* $(TYPECHECK)/diffmath/ && ln -s $(CURDIR)/kernels $(TYPECHECK)/diffmath/kernels
	cd $(TYPECHECK) && $(MYPY) -p diffmath.kernels

# The side-by-side table (kernel / fallback / eager / torch.compile / diffusers), then the
# pytest-benchmark suite over the same cases (BENCH_ARGS=--benchmark-json=FILE to save it).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
	$(PY) -m diffmath bench
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-group-by=group $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks .mypy_cache .ruff_cache
