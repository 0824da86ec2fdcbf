# fastmil developer entry points. Every target creates/updates .venv itself, so a fresh clone needs only `make X`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of this release lies on the build machines' disk; any torch>=2.4 already installed is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.fastmil-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo test bench aot clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmil demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	mkdir -p bench_out
	$(PY) -m pytest benchmarks -q -o addopts="" --benchmark-only --benchmark-json=bench_out/bench.json \
		--benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)
	$(PY) benchmarks/report.py bench_out/bench.json

# Ahead-of-time compile of every Triton kernel specialisation for sm_80 and sm_90, no GPU needed; fails on any
# register spill or shared-memory overflow. TRITON_INTERPRET must not reach the compiler process.
aot: $(STAMP)
	mkdir -p bench_out
	env -u TRITON_INTERPRET $(PY) -m fastmil.aot --targets 80,90 --json bench_out/aot.json

clean:
	rm -rf $(VENV) $(DEMO_OUT) bench_out .pytest_cache
