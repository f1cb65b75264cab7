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

.PHONY: venv test bench bench-gpu clean test-frameworks test-axolotl test-llamafactory test-ms-swift test-verl

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
# PyTorch backend there), the CPU goal of the one-pass head (cpu-goal: N=4096, D=1024, V=32000 against the
# three products it needs, and the peers), and a check of every Triton backward mode on the interpreter. Results,
# tables and plots go to a scratch folder (python -m bench --help); BENCH_ARGS="--out docs/benchmarks"
# updates the tracked ones (see docs/benchmarks/README.md).
BENCH_ARGS ?=
bench: venv
	$(PY) -m bench $(BENCH_ARGS)
ifneq ($(HAS_GPU),1)
	$(PY) -m bench --suite cpu-goal $(BENCH_ARGS)
	$(PY) -m bench --interpret --device cpu --shapes 64x1000 --tokens 48 \
		--providers dft-ops-gemm dft-ops-fused dft-ops-filter dft-ops-onepass $(BENCH_ARGS)
endif

# A GPU window's plan on a GPU machine of your own (docs/benchmarks/README.md): call1 (probe, carried
# wheels from bench/fetch_wheels.sh, float64 smoke check, curated GPU tests) into $(BENCH_OUT)/call1, then
# call2 (the headline benchmark and the goal lines) into $(BENCH_OUT)/call2. On the lent device the two
# calls are two device commands instead (the README gives them).
BENCH_OUT ?= /tmp/dft-ops-bench-gpu-out
bench-gpu:
	bash bench/gpu_run.sh call1 $(BENCH_OUT)/call1; bash bench/gpu_run.sh call2 $(BENCH_OUT)/call2

# Fine-tuning frameworks, each in a virtual environment of its own (they pin transformers / TRL
# apart from ours): torch first, then the framework under a constraint that keeps that torch, then
# dft-ops (editable) and pytest; then its test file in tests/integrations/ (docs/integrations.md).
# FW_VENVS=/path reuses environments made elsewhere. pytest runs as the venv's `pytest` script, not
# `python -m pytest`: the latter puts the checkout first on sys.path, where kernels/ would shadow
# Hugging Face's `kernels` package that axolotl imports.
FW_VENVS ?= $(VENV)/frameworks
FW_CONSTRAINTS := $(FW_VENVS)/constraints.txt
AXOLOTL_SPEC ?= axolotl==0.19.0
LLAMAFACTORY_VERSION ?= 0.9.5
MS_SWIFT_SPEC ?= ms-swift==4.6.0
VERL_SPEC ?= verl==0.9.1
FW_PYTEST_ARGS ?= -q -s

$(FW_CONSTRAINTS):
	mkdir -p $(FW_VENVS)
	echo "$(TORCH_SPEC)" > $@

# $(call fw_venv,NAME): the venv with torch, ready for the framework
define fw_venv
	@echo "==> [$(1)] creating $(FW_VENVS)/$(1) and installing $(TORCH_SPEC)"
	$(PYTHON) -m venv $(FW_VENVS)/$(1)
	$(FW_VENVS)/$(1)/bin/python -m pip install --progress-bar off "$(TORCH_SPEC)"
endef
# $(call fw_finish,NAME): dft-ops (editable, with its own dependencies) and pytest, then the stamp
define fw_finish
	@echo "==> [$(1)] installing dft-ops (editable) and pytest"
	$(FW_VENVS)/$(1)/bin/python -m pip install --progress-bar off -c $(FW_CONSTRAINTS) -e . pytest
	touch $(FW_VENVS)/$(1)/.installed
endef

$(FW_VENVS)/axolotl/.installed: $(FW_CONSTRAINTS)
	$(call fw_venv,axolotl)
	@echo "==> [axolotl] installing $(AXOLOTL_SPEC) (~8 min, ~4.3 GB)"
	$(FW_VENVS)/axolotl/bin/python -m pip install --progress-bar off -c $(FW_CONSTRAINTS) "$(AXOLOTL_SPEC)"
	$(call fw_finish,axolotl)

$(FW_VENVS)/llamafactory/.installed: $(FW_CONSTRAINTS)
	$(call fw_venv,llamafactory)
	@echo "==> [llamafactory] installing llamafactory==$(LLAMAFACTORY_VERSION) without torchaudio / torchvision (~7 min)"
	$(FW_VENVS)/llamafactory/bin/python tests/integrations/setup_llamafactory.py $(LLAMAFACTORY_VERSION) $(abspath $(FW_CONSTRAINTS))
	$(call fw_finish,llamafactory)

$(FW_VENVS)/ms-swift/.installed: $(FW_CONSTRAINTS)
	$(call fw_venv,ms-swift)
	@echo "==> [ms-swift] installing $(MS_SWIFT_SPEC) (~6 min, ~2 GB)"
	$(FW_VENVS)/ms-swift/bin/python -m pip install --progress-bar off -c $(FW_CONSTRAINTS) "$(MS_SWIFT_SPEC)"
	$(call fw_finish,ms-swift)

$(FW_VENVS)/verl/.installed: $(FW_CONSTRAINTS)
	$(call fw_venv,verl)
	@echo "==> [verl] installing $(VERL_SPEC) (~5 min, ~2 GB)"
	$(FW_VENVS)/verl/bin/python -m pip install --progress-bar off -c $(FW_CONSTRAINTS) "$(VERL_SPEC)"
	$(call fw_finish,verl)

# axolotl: its own DFT (Liger, on the Triton interpreter here) against the plugin: 10-15 min of tests (2 cores)
test-axolotl: $(FW_VENVS)/axolotl/.installed
	$(FW_VENVS)/axolotl/bin/pytest $(FW_PYTEST_ARGS) tests/integrations/test_axolotl.py

test-llamafactory: $(FW_VENVS)/llamafactory/.installed
	$(FW_VENVS)/llamafactory/bin/pytest $(FW_PYTEST_ARGS) tests/integrations/test_llamafactory.py

test-ms-swift: $(FW_VENVS)/ms-swift/.installed
	$(FW_VENVS)/ms-swift/bin/pytest $(FW_PYTEST_ARGS) tests/integrations/test_ms_swift.py

# verl: the drop-in for its fused kernel against verl's own torch path and forwards (and its Triton kernel
# on a GPU), and the interface of that kernel pinned (issue 17)
test-verl: $(FW_VENVS)/verl/.installed
	$(FW_VENVS)/verl/bin/pytest $(FW_PYTEST_ARGS) tests/integrations/test_verl.py tests/integrations/test_verl_probe.py

test-frameworks: test-llamafactory test-ms-swift test-axolotl test-verl

clean:
	rm -rf $(VENV) .pytest_cache
