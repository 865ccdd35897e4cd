# Two entry points (see README): `make serve` and `make test`. Both are idempotent: the virtual
# environment is created once and re-installed only when the packaging or csrc/ changes.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kimi-grpc-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?= 8000

.PHONY: install kimi-cli serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 is taken from the local wheel where one exists.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet setuptools wheel pybind11 ninja
	# No build isolation: the extension must compile against the torch installed above.
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# The product: the gRPC server and the OpenAI-compatible HTTP API on the built-in demo model
# (Ctrl-C / SIGTERM drains both and stops).
serve: install
	$(BIN)/kimi-grpc serve --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT)

# Moonshot's kimi-cli for tests/test_http_kimi_cli.py: its own virtualenv (Python >= 3.12; it pins
# an openai release older than the one the other client tests use).
kimi-cli:
	bash scripts/kimi_cli_venv.sh

test: lint kimi-cli
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run --Werror $(NATIVE_SOURCES)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/nvcc_check.sh

clean:
	rm -rf $(VENV) build *.egg-info kimi_grpc/_C*.so
