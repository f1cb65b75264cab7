# Everything sets itself up: `make bench` and `make test` create .venv and install
# what they need on a fresh machine. Torch goes in first: without a GPU we ask
# for torch==2.13.0, which these machines serve as a local CPU wheel (any other
# spec pulls several GB of CUDA packages).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test bench bench-gpu clean

# Set-up prints each step and pip's own progress: a first run takes a few minutes.
$(STAMP): pyproject.toml setup.py Makefile
	@echo "==> [1/3] creating the virtual environment $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] installing $(TORCH_SPEC) (the largest download; a minute or more)"
	$(PY) -m pip install --progress-bar on "$(TORCH_SPEC)"
	@echo "==> [3/3] installing dft-ops (editable) with its test and bench extras: transformers, trl, liger-kernel, ..."
	$(PY) -m pip install --progress-bar on -e ".[test,bench]"
	touch $(STAMP)
	@echo "==> $(VENV) is ready"

venv: $(STAMP)

# DeepSpeed for the ZeRO-1/2/3 tests (tests/test_distributed.py): a source distribution whose setup
# imports torch, so no build isolation, and DS_BUILD_OPS=0 compiles none of its CUDA/C++ ops.
DS_STAMP := $(VENV)/.deepspeed
$(DS_STAMP): $(STAMP)
	@echo "==> installing DeepSpeed for the ZeRO tests (no compiled ops)"
	DS_BUILD_OPS=0 $(PY) -m pip install --progress-bar on --no-build-isolation "deepspeed>=0.16"
	touch $(DS_STAMP)

# Triton kernels run on the CPU interpreter when there is no GPU (tests/conftest.py);
# tests/test_compile.py also compiles every kernel configuration for sm_80 / sm_90.
test: venv $(DS_STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS) tests

# The main job: the full benchmark on a CUDA GPU; without one, a small CPU run (dft-ops runs its
# PyTorch backend there) and a check of every Triton backward mode on the interpreter. Results,
# tables and plots go to a scratch folder (python -m bench --help); BENCH_ARGS="--out docs/benchmarks"
# updates the tracked ones (see docs/benchmarks/README.md).
BENCH_ARGS ?=
bench: venv
	$(PY) -m bench $(BENCH_ARGS)
ifneq ($(HAS_GPU),1)
	$(PY) -m bench --interpret --device cpu --shapes 64x1000 --tokens 48 \
		--providers dft-ops-gemm dft-ops-fused dft-ops-filter $(BENCH_ARGS)
endif

# A GPU window's plan on a GPU machine of your own (docs/benchmarks/README.md): call1 (probe, carried
# wheels from bench/fetch_wheels.sh, float64 smoke check, curated GPU tests) into $(BENCH_OUT)/call1, then
# call2 (the headline benchmark and the goal lines) into $(BENCH_OUT)/call2. On the lent device the two
# calls are two device commands instead (the README gives them).
BENCH_OUT ?= /tmp/dft-ops-bench-gpu-out
bench-gpu:
	bash bench/gpu_run.sh call1 $(BENCH_OUT)/call1; bash bench/gpu_run.sh call2 $(BENCH_OUT)/call2

clean:
	rm -rf $(VENV) .pytest_cache
