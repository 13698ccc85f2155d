# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A plain `torch` requirement can pull a multi-GB CUDA build; machines without a GPU take the CPU
# wheel pinned here. On a GPU machine: make TORCH=torch ...
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

# the whole job on the embedded default: generate 1M rows, prepare, search, gate, deploy, smoke request;
# serves until Ctrl-C (ARGS=--no-wait to exit after the smoke request)
demo: $(STAMP)
	$(VENV)/bin/rankray pipeline --config configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf runs data/generated
