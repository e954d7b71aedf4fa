# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= params/demo.yaml

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

.PHONY: install demo run test sync
install: $(VENV)/.installed

demo: $(VENV)/.installed  ## all four notebooks on the built-in set, tiny model, CPU
	$(PY) -m furlib.pipeline params/demo.yaml

run: $(VENV)/.installed  ## any profile: make run PROFILE=params/furception_v1.yaml
	$(PY) -m furlib.pipeline $(PROFILE)

test: $(VENV)/.installed
	$(PY) -m pytest -q

sync: $(VENV)/.installed  ## after editing notebooks/*.py
	$(VENV)/bin/jupytext --sync notebooks/*.py
