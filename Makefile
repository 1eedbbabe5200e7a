# Two commands for a fresh machine (each installs what it needs into .venv first):
#   make pipeline   the main job: all four stages on the embedded sentiment task, offline, CPU
#   make test       the test suite
#   make lint       ruff (pyflakes, import order, bugbear, pyupgrade)
# TORCH picks the torch wheel: the pinned CPU build by default; e.g. TORCH=torch for your CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: setup test lint pipeline bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

pipeline: setup
	$(VENV)/bin/textenv pipeline $(ARGS)

clean:
	rm -rf $(VENV) runs
