# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned dependencies (pyproject.toml) first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean protos

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

# GPU hosts: the gpu extra (TensorRT, cuda-python, onnxruntime-gpu). insightface and our
# base pins pull the CPU onnxruntime too, and both wheels own the `onnxruntime` module:
# remove the CPU one, reinstall the GPU one over the shared files, then check it answers.
# Keep ORT_GPU_VERSION equal to the onnxruntime-gpu pin in pyproject.toml. Run it again
# after any other pip install into .venv (see README "GPU install").
ORT_GPU_VERSION := 1.31.1
CUDA_PYTHON_VERSION := 13.4.4
.PHONY: install-gpu install-cuda
install-gpu: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[gpu,test]'
	$(MAKE) --no-print-directory _ort-gpu

# GPU hosts where TensorRT cannot be installed: cuda-python and onnxruntime-gpu only (the
# CUDA EP, the cuda-python GPU tests, device memory in benchmarks; the tensorrt backend
# then falls back). Keep CUDA_PYTHON_VERSION equal to the cuda-python pin in pyproject.toml.
install-cuda: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check cuda-python==$(CUDA_PYTHON_VERSION)
	$(MAKE) --no-print-directory _ort-gpu

.PHONY: _ort-gpu
_ort-gpu:
	$(BIN)/python -m pip uninstall --quiet -y onnxruntime
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		onnxruntime-gpu==$(ORT_GPU_VERSION)
	$(BIN)/python -c "import onnxruntime as o, sys; p = o.get_available_providers(); \
		print('onnxruntime', o.__version__, o.get_device(), p); \
		sys.exit(0 if o.get_device() == 'GPU' and 'CUDAExecutionProvider' in p else 1)"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/arcface demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Regenerate the committed gRPC stubs from serve_app/protos/embedding.proto.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. serve_app/protos/embedding.proto
