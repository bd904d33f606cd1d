# One command installs and tests, one installs and runs the demo.
# torch: the CPU build that lies on disk (torch==2.13.0) is installed first unless a torch is
# already importable, so pip never resolves "torch>=2.4" to a multi-GB CUDA build.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test demo bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	mambamorph demo

bench: install
	mambamorph bench
