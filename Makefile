# Two entry points for a fresh machine: `make demo` and `make test`. Everything the
# project needs (Python packages, DICOM validators, a Triton server) is installed here.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
TRITON := .triton

.PHONY: demo test test-fast install lint typecheck clean system-deps triton-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned to the CPU wheel that pip finds locally (a range would pull CUDA).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[train,export,serve,dev]'
	# tensorrt-stubs declares a dependency on tensorrt itself, which cannot be installed here.
	$(PIP) install -q --no-deps tensorrt-stubs
	touch $(STAMP)

install: $(STAMP)

# dciodvfy (dicom3tools) validates the DICOM we write; dcmdump helps debugging.
system-deps:
	@if ! command -v dciodvfy >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends dicom3tools dcmtk >/dev/null; \
	fi

demo: $(STAMP)
	$(PY) -m cmc_cli.demo --out $(DEMO_DIR)

# Local Triton server: the nvidia-pytriton wheel in its own venv (numpy<2), see cmc_serve/triton/setup.py
$(TRITON)/.ready: $(STAMP) cmc_serve/triton/setup.py
	$(PY) -m cmc_serve.triton.setup --prefix $(TRITON)

triton-server: $(TRITON)/.ready

test: $(STAMP) system-deps $(TRITON)/.ready
	$(PY) -m pytest -q

# The suite without the slow (> ~30 s each) and Triton tests: the loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not triton"

# mypy with the configuration in pyproject.toml ([tool.mypy]: which files, how strict).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

lint: $(STAMP)
	$(VENV)/bin/ruff check cmc_common cmc_train cmc_export cmc_serve cmc_cli tests bench cmc_model_repository

clean:
	rm -rf $(VENV) $(TRITON) $(DEMO_DIR) .pytest_cache
