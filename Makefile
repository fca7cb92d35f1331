# The two commands a fresh clone needs: `make train` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test ui lint bench gpu-check

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: $(STAMP)  ## train the offline demo (digits) into the local MLflow store
	$(PY) tools/train_net.py --config-file config/digits.yaml

test: $(STAMP)  ## lint (Python, shell, Dockerfile), then the whole test suite
	$(PY) -m ruff check .
	$(VENV)/bin/shellcheck tools/*.sh docker/*.sh
	$(VENV)/bin/hadolint docker/Dockerfile
	$(PY) -m pytest

bench: $(STAMP)  ## speed of the engine against a bare PyTorch loop (about 8 minutes on 2 CPU cores)
	$(PY) tools/benchmark.py

gpu-check: $(STAMP)  ## on a GPU machine, once: every CUDA path (AMP, dp, NCCL, resume, ...), a PASS/FAIL table (~8 min)
	$(PY) tools/gpu_check.py

ui: $(STAMP)  ## MLflow UI for the local store on http://127.0.0.1:$${MLFLOW_PORT:-5000} (MLFLOW_ARGS="--workers 4")
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh tools/mlflow_ui.sh $(MLFLOW_ARGS)
