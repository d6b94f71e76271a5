# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch and torchvision are pinned first: on the project's machines pip takes exactly that pair
# from local disk, while other pins pull multi-GB CUDA builds or a torchvision that won't import.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo test lint typecheck check-imports check-trt unit unit-main unit-cluster unit-serve unit-multinode test-seconds wheel device-wheels clean

$(BIN)/.installed: pyproject.toml Makefile
	@echo "make: creating $(VENV) and installing dbmef (once; a few minutes on a fresh machine)"
	$(PY) -m venv $(VENV)
	@echo "make: 1/2 $(TORCH_PIN)"
	$(PIP) $(TORCH_PIN) 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, torchvision"
	@echo "make: 2/2 dbmef and its extras cpu, export, test, ray, digits (onnxruntime, diffusers, timm, ray, ...)"
	$(PIP) -e '.[cpu,export,test,ray,digits]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import dbmef.runtime, onnxruntime, diffusers, timm, ray.data, ray.serve, sklearn, tritonclient.grpc"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/dbmef demo

lint: $(BIN)/.installed
	$(BIN)/ruff check dbmef tests benchmarks tools

typecheck: $(BIN)/.installed
	$(BIN)/mypy

check-imports: $(BIN)/.installed
	$(BIN)/lint-imports

# The generated TensorRT stubs of every version check_trt.py names, made before the suite, which reads
# them (tests/runtime/test_trt.py's check of a misspelt method is skipped where they are missing).
TRT_STUBS := .cache/check-trt/stubs.made
$(TRT_STUBS): tools/check_trt/check_trt.py | $(BIN)/.installed
	$(BIN)/python tools/check_trt/check_trt.py --stubs-only
	touch $@

# TensorRT 10.x/11.x and cuda-python calls checked against stubs of the real bindings (no GPU).
check-trt: $(BIN)/.installed $(TRT_STUBS)
	$(BIN)/python tools/check_trt/check_trt.py --self-test

# PYTHONFAULTHANDLER keeps a crash's Python stacks on stderr even after pytest has unconfigured
# (a native crash at interpreter exit would otherwise print nothing but "Segmentation fault").
# The main suite runs in pytest-xdist workers, one per core, each computing on one thread
# (tests/conftest.py: one_thread_per_worker); a file's tests stay on one worker, so its module
# fixtures are built once, and the files are dealt slowest first, by tests/file_seconds.json
# (`make test-seconds` measures it anew). `make unit XDIST=` runs it in this process.
# The service and multi-node Ray tests run in processes of their own: see tests/cluster/conftest.py.
XDIST ?= -n auto --dist loadfile --no-loadscope-reorder
MAIN_SUITE := --ignore=tests/cluster/test_serve.py --ignore=tests/cluster/test_multinode.py
unit: $(BIN)/.installed
	$(MAKE) --no-print-directory unit-main
	$(MAKE) --no-print-directory unit-cluster

unit-main: $(BIN)/.installed $(TRT_STUBS)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q $(XDIST) --durations=25 $(MAIN_SUITE)

test-seconds: $(BIN)/.installed $(TRT_STUBS)
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q $(XDIST) --store-file-seconds $(MAIN_SUITE)

unit-cluster: $(BIN)/.installed
	$(MAKE) --no-print-directory unit-serve unit-multinode

# Each in a process of its own; they may run side by side (the multi-node cluster has a Ray folder of its
# own, so no other ray.init() on the machine can join it).
unit-serve: $(BIN)/.installed
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q tests/cluster/test_serve.py

unit-multinode: $(BIN)/.installed
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest -q tests/cluster/test_multinode.py

# The two quick checks; the main suite on both cores; then the slow static checks, single-threaded
# each, side by side with the two Ray processes, which mostly wait (on Ray's start, on the service).
# Output is kept per target, so each log reads as if it ran alone.
test: $(BIN)/.installed
	$(MAKE) --no-print-directory -j2 --output-sync=target lint check-imports
	$(MAKE) --no-print-directory unit-main
	$(MAKE) --no-print-directory -j4 --output-sync=target typecheck check-trt unit-serve unit-multinode

# The wheel the README's Install table installs (pip install 'dist/dbmef-<version>-py3-none-any.whl[cpu]');
# tests/test_install_cpu_only.py builds it the same way. build/ is removed first: an in-tree build
# would otherwise package modules that no longer exist in the sources.
wheel: $(BIN)/.installed
	rm -rf build
	$(BIN)/python -m pip wheel -q --no-deps --disable-pip-version-check -w dist .
	@ls dist/*.whl

# What benchmarks/device_check.py needs on the GPU machine beyond its torch, onnx and CUDA (it has no
# package registry): diffusers and what it imports, at this venv's versions, pure-python or abi3
# wheels plus regex for Python 3.10-3.13. A few MB, unpacked there by the check itself.
DEVICE_WHEELS := diffusers huggingface[-_]hub safetensors requests urllib3 idna certifi charset[-_]normalizer \
	tqdm pyyaml packaging filelock fsspec importlib[-_]metadata zipp anyio sniffio h11 httpcore2 httpx2
device-wheels: $(BIN)/.installed
	mkdir -p .device/wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .device/wheels \
	    $$($(BIN)/python -m pip freeze | grep -iE '^($(shell echo $(DEVICE_WHEELS) | tr ' ' '|'))==')
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/python -m pip download -q --no-deps --only-binary=:all: \
	    --python-version $$v -d .device/wheels $$($(BIN)/python -m pip freeze | grep -iE '^(regex|pyyaml|charset[-_]normalizer|pillow)=='); done
	du -sh .device/wheels

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist
