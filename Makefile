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

# dciodvfy (dicom3tools) validates the DICOM we write; dcmdump helps debugging. Orthanc and
# its DICOMweb plugin play the PACS in the `cmc listen` tests, Chromium (headless) opens the
# status page and report.html. slurm-wlm and munge make the single-node Slurm cluster the
# scale-out tests submit deploy/slurm/ to. apt/dpkg take a lock: a busy one is waited for
# and retried.
SYSTEM_PACKAGES := dicom3tools dcmtk orthanc orthanc-dicomweb chromium slurm-wlm munge
system-deps:
	@if ! command -v dciodvfy >/dev/null 2>&1 || ! command -v storescu >/dev/null 2>&1 \
		|| [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
		|| ! command -v chromium >/dev/null 2>&1 \
		|| [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		for try in 1 2 3 4 5 6; do \
			$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
				--no-install-recommends $(SYSTEM_PACKAGES) >/dev/null && break; \
			[ $$try = 6 ] && { echo "apt-get install $(SYSTEM_PACKAGES) failed 6 times"; exit 1; }; \
			echo "apt-get failed (dpkg lock held?), retrying in 20 s"; sleep 20; \
		done; \
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
	$(VENV)/bin/ruff check cmc_common cmc_train cmc_export cmc_serve cli tests bench model_repository

clean:
	rm -rf $(VENV) $(TRITON) $(DEMO_DIR) .pytest_cache
