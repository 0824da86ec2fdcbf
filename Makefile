# fastmil developer entry points. Every target creates/updates .venv itself, so a fresh clone needs only `make X`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of this release lies on the build machines' disk; any torch>=2.4 already installed is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.fastmil-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: venv demo test test-numeric-path test-code-paths mutants bench aot aot-triton lint clean device-check

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

# The numeric tests (ops, modules, methods against their references) once more on other CPU code paths: MKL's
# compatibility branch, ATen's scalar kernels, one thread, OpenBLAS's AVX kernels for the Triton interpreter's dots
# (tests/README.md). .ci/run runs it.
NUMERIC_TESTS ?= tests/ops tests/nn tests/methods

test-numeric-path: $(STAMP)
	MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default FASTMIL_TORCH_THREADS=1 OPENBLAS_CORETYPE=Sandybridge \
		$(PY) -m pytest -q $(NUMERIC_TESTS)

# The whole suite once per code path (MKL_CBWR, ATEN_CPU_CAPABILITY, threads, OPENBLAS_CORETYPE; tests/code_paths.py),
# tabulated in bench_out/code_paths/.
test-code-paths: $(STAMP)
	$(PY) -m tests.code_paths $(PYTEST_ARGS)

# Small bugs the numeric tests must catch (tests/mutants.py): fails if one survives.
mutants: $(STAMP)
	$(PY) -m tests.mutants

bench: $(STAMP)
	mkdir -p bench_out
	$(PY) -m pytest benchmarks -q -o addopts="" --benchmark-only --benchmark-json=bench_out/bench.json \
		--benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)
	$(PY) benchmarks/report.py bench_out/bench.json

# Ahead-of-time compile of every Triton kernel specialisation the launchers can produce, for sm_80 and sm_90, no
# GPU needed, on every triton release fastmil declares (kernels/limits.py CHECKED_TRITON, pyproject's range); fails
# on any register spill, shared-memory overflow or compile error. A release other than the one in .venv gets a
# venv of its own (.venv-aot-triton-X: the CPU torch wheel + that triton). TRITON_INTERPRET must not reach it.
AOT_TRITON ?= 3.8.0 3.9.0

aot: $(STAMP)
	mkdir -p bench_out
	@set -e; for v in $(AOT_TRITON); do $(MAKE) --no-print-directory aot-triton TRITON=$$v; done
	$(PY) -m fastmil.aot --matrix $(foreach v,$(AOT_TRITON),bench_out/aot-triton-$(v).json)

aot-triton: $(STAMP)
	@set -e; py=$(PY); \
	if [ "$$($(PY) -c 'import importlib.metadata as m; print(m.version("triton"))')" != "$(TRITON)" ]; then \
		venv=.venv-aot-triton-$(TRITON); py=$$venv/bin/python; \
		if [ ! -f $$venv/.installed ]; then \
			$(PYTHON) -m venv $$venv; \
			$$py -m pip install --quiet --upgrade pip; \
			$$py -m pip install --quiet "$(TORCH_SPEC)" "triton==$(TRITON)" numpy; \
			$$py -m pip install --quiet --no-deps -e .; \
			touch $$venv/.installed; \
		fi; \
	fi; \
	env -u TRITON_INTERPRET $$py -m fastmil.aot --targets 80,90 --json bench_out/aot-triton-$(TRITON).json

# The prepared run for a machine with a CUDA GPU (benchmarks/device_check.py): op accuracy of the compiled kernels
# against fp64 references, the tests that need CUDA, the CUDA benchmark cases; results in DEVICE_OUT. It runs with the
# Python that holds the machine's CUDA torch (DEVICE_PYTHON), not .venv's CPU build, and installs nothing from an
# index: wheels of missing dependencies can be carried in .whl/ (README "On a GPU machine").
DEVICE_PYTHON ?= python3
DEVICE_OUT ?= bench_out/device
DEVICE_ARGS ?=

device-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(DEVICE_PYTHON) -m pip install --quiet --no-index --no-deps .whl/*.whl; fi
	$(DEVICE_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(DEVICE_PYTHON) benchmarks/device_check.py --out $(DEVICE_OUT) $(DEVICE_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fastmil kernels tests benchmarks ray_jobs

clean:
	rm -rf $(VENV) .venv-aot-triton-* $(DEMO_OUT) bench_out .pytest_cache
