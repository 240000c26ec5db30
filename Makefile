# Every target creates .venv and installs on first use; nothing else is assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The local CPU build here; override (e.g. TORCH_SPEC=torch) to bring your own torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# OpenMP threads that spin while waiting make 2-thread torch 4-9x slower on shared cores.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m diffmath demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# The side-by-side table (kernel / fallback / eager / torch.compile / diffusers), then the
# pytest-benchmark suite over the same cases (BENCH_ARGS=--benchmark-json=FILE to save it).
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
	$(PY) -m diffmath bench
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-group-by=group $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
