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
