# bdlkern: every target sets itself up on a fresh machine (a .venv with the pinned dependencies,
# then an incremental ninja build of the extension) before it runs.
#
#   make test    - build, run the test suite, then build and run the CMake/ctest smoke test
#   make demo    - build and run the main job, the demo (python -m bdlkern.demo; writes results/)
#   make bench   - build and run the benchmark harness (python -m bdlkern.bench)
#   make sanitize - the op tests under AddressSanitizer+UBSan (CPU-only and SIMT extensions) and
#                  ThreadSanitizer (SIMT extension), each a separate build (tools/sanitize.sh)
#   make gpu-check - on a CUDA machine: build for its GPU, the CUDA tests, compute-sanitizer, graph
#                  capture and the CUDA benchmarks, one table (tools/gpu_check.sh; --dry-run without one)
#   make build   - only set up and build
#   make clean   - remove build outputs (keeps .venv)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.requirements-installed

.PHONY: all venv build test pytest ctest demo bench sanitize gpu-check clean distclean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

venv: $(STAMP)

# Always re-run: ninja recompiles only what changed (build/temp keeps the objects). The development
# build includes the SIMT test extension (BDLKERN_SIMT=1), which release builds leave out.
build: $(STAMP)
	BDLKERN_SIMT=1 $(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import bdlkern, json; print('bdlkern build:', json.dumps(bdlkern.build_info()))"

pytest: build
	$(PY) -m pytest

ctest: build
	bash cmake/ctest_smoke.sh $(PY)

test: pytest ctest

# The main job: plain, MC-dropout, Concrete-dropout and sparse-VD MLPs on scikit-learn's digits; the table is
# printed, report.json, report.md and the figures go to results/.
demo: build
	$(PY) -m bdlkern.demo

bench: build
	$(PY) -m bdlkern.bench

# Needs the normal build too: the TSan run links its uninstrumented _C next to the instrumented SIMT
# extension.
sanitize: build
	bash tools/sanitize.sh $(PY)

gpu-check: $(STAMP)
	bash tools/gpu_check.sh $(PY)

clean:
	rm -rf build bdlkern/*.so *.egg-info .pytest_cache

distclean: clean
	rm -rf $(VENV)
