# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned dependencies (pyproject.toml) first; `make test`
# also fetches the TensorRT / cuda-python bindings its conformance test reads (api-bindings).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean protos

# Packages are installed with uv (pinned here, bootstrapped into the venv by pip): it resolves
# the same versions as pip from the same pins and installs them in seconds instead of minutes,
# which is most of a fresh clone's `make test` before the first test runs. pip stays in the
# venv for anyone who installs by hand (README "GPU install").
UV_VERSION := 0.13.9
UV       := $(BIN)/uv
UV_PIP   := $(UV) pip install --quiet --python $(BIN)/python

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(UV) --version 2>/dev/null | grep -q ' $(UV_VERSION)$$' || \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV_PIP) -e '.[test]'
	@touch $@

install: $(STAMP)

# GPU hosts (README "GPU install"): one stack, CUDA 13 throughout, NVIDIA driver 580+.
# install-gpu: the gpu extra (TensorRT 11 for CUDA 13, cuda-python 13, onnxruntime-gpu and
# the CUDA 13 / cuDNN 9 wheels its CUDA EP loads). install-cuda: the cuda extra only, for
# hosts where TensorRT cannot be installed (the tensorrt backend then falls back).
# insightface and our base pins pull the CPU onnxruntime too, and both wheels own the
# `onnxruntime` module: remove the CPU one, reinstall the GPU one over the shared files,
# then check the stack loads: a real CUDA EP session, not the list of compiled-in
# providers (python -m engines.gpu_stack; it prints the driver when CUDA refuses it).
# Keep ORT_GPU_VERSION equal to the onnxruntime-gpu pin in pyproject.toml (a test checks).
# Run it again after any other pip (or uv pip) install into .venv.
ORT_GPU_VERSION := 1.31.1
.PHONY: install-gpu install-cuda _ort-gpu gpu-check
install-gpu: $(STAMP)
	$(UV_PIP) -e '.[gpu,test]'
	$(MAKE) --no-print-directory _ort-gpu STACK_CHECK_ARGS=

install-cuda: $(STAMP)
	$(UV_PIP) -e '.[cuda,test]'
	$(MAKE) --no-print-directory _ort-gpu STACK_CHECK_ARGS=--without-tensorrt

_ort-gpu:
	$(UV) pip uninstall --quiet --python $(BIN)/python onnxruntime
	$(UV_PIP) --reinstall --no-deps \
		onnxruntime-gpu==$(ORT_GPU_VERSION)
	$(BIN)/python -m engines.gpu_stack $(STACK_CHECK_ARGS)
	@touch $(STAMP)

# One check of a fresh GPU host after the GPU install, in under 10 minutes; writes
# out/gpu-check/report.json (README "GPU check"). Where TensorRT is missing it runs the rest.
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --out out/gpu-check

# The binding-conformance test (tests/engines/tensorrt/test_api_conformance.py) checks the
# names and signatures the code uses against the real TensorRT 10 and 11 Python bindings and
# cuda-python 12 and 13. They are fetched here as pinned wheels into ignored directories that
# are never on the venv's path (tensorrt_installed() stays false on a CPU host); the TensorRT
# bindings import against stand-in libraries built here from tests/helpers/trt_standins/*.c,
# which export only the C entry points the bindings resolve at load and run nothing.
# TRT11_BINDINGS_VERSION is the tensorrt-cu13 pin, CUDA13_BINDINGS_VERSION the cuda-python one.
TRT10_BINDINGS_VERSION := 10.13.3.9
TRT11_BINDINGS_VERSION := 11.4.0.106
CUDA12_BINDINGS_VERSION := 12.9.10
CUDA13_BINDINGS_VERSION := 13.4.4
CUDA_PATHFINDER_VERSION := 1.9.1
API_STAMP := $(VENV)/.api-bindings-installed
STANDINS := tests/helpers/trt_standins
PIP_TARGET := $(UV_PIP) --no-deps --only-binary :all: --target
.PHONY: api-bindings
api-bindings: $(API_STAMP)
$(API_STAMP): Makefile $(wildcard $(STANDINS)/*.c) | $(STAMP)
	@command -v gcc >/dev/null || { echo "make api-bindings needs gcc (e.g. apt-get install gcc)" >&2; exit 1; }
	rm -rf $(VENV)/trt-bindings $(VENV)/cuda-bindings
	$(PIP_TARGET) $(VENV)/trt-bindings/10 tensorrt-cu12-bindings==$(TRT10_BINDINGS_VERSION)
	$(PIP_TARGET) $(VENV)/trt-bindings/11 tensorrt-cu13-bindings==$(TRT11_BINDINGS_VERSION)
	$(PIP_TARGET) $(VENV)/cuda-bindings/12 cuda-bindings==$(CUDA12_BINDINGS_VERSION) \
		cuda-pathfinder==$(CUDA_PATHFINDER_VERSION)
	$(PIP_TARGET) $(VENV)/cuda-bindings/13 cuda-bindings==$(CUDA13_BINDINGS_VERSION) \
		cuda-pathfinder==$(CUDA_PATHFINDER_VERSION)
	for major in 10 11; do \
		lib=$(VENV)/trt-bindings/$$major/standins; mkdir -p $$lib; \
		for name in nvinfer nvonnxparser nvinfer_plugin; do \
			gcc -shared -fPIC -O1 -Wall -Werror -Wl,-soname,lib$$name.so.$$major \
				-o $$lib/lib$$name.so.$$major $(STANDINS)/$$name.c || exit 1; \
		done; \
	done
	@touch $@

demo: $(STAMP)
	$(BIN)/arcface demo

lint: $(STAMP)
	$(BIN)/ruff check .

# ARCFACE_REQUIRE_API_BINDINGS: the conformance test fails (not skips) without its bindings.
test: $(STAMP) $(API_STAMP)
	$(BIN)/ruff check .
	ARCFACE_REQUIRE_API_BINDINGS=1 $(BIN)/python -m pytest -m "not gpu"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Regenerate the committed gRPC stubs from serve_app/protos/embedding.proto.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. serve_app/protos/embedding.proto
