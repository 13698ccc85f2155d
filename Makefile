# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A plain `torch` requirement can pull a multi-GB CUDA build; machines without a GPU take the CPU
# wheel pinned here. On a GPU machine: make TORCH=torch ...
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test audit bench autogluon clean

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

# two pytest workers (a whole test module each at a time, heaviest first: tests/conftest.py), each with its
# own local Ray: one process leaves a third of the 2 cores idle while Ray starts processes
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# every benchmark in about 45 min on the 2-core dev machine; rewrites docs/BENCHMARKS.md and the README's figures
# table from that one run (ARGS="--only quality-movielens" runs sections and prints their figures, writing nothing)
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	@touch $@

bench: $(VENV)/.bench .venv-autogluon/.installed
	$(PY) benchmarks/run_all.py $(ARGS)

# AutoGluon-Tabular, the quality suite's AutoML peer (benchmarks/autogluon_peer.py), in a venv of its own: it
# pins another Ray. Its gradient-boosting models; no PyTorch here, so not its neural ones.
.venv-autogluon/.installed:
	$(PYTHON) -m venv .venv-autogluon
	.venv-autogluon/bin/pip install -q "autogluon.tabular[lightgbm,catboost,xgboost]==1.6.3"
	@touch $@

autogluon: .venv-autogluon/.installed

# Known vulnerabilities in the installed (locked) dependencies: pip-audit, in a venv of its own so its
# own packages are not audited, over `pip freeze` of .venv (local versions like +cpu dropped). Fails on
# a vulnerability with a fix available, and when a package cannot be audited (.ci/audit_check.py).
# Needs a vulnerability service: PyPI's per-version JSON API (AUDIT_SERVICE=pypi) or api.osv.dev
# (AUDIT_SERVICE=osv). Not part of `make test` / .ci/run: where neither is reachable it fails.
AUDIT_VENV ?= $(VENV)/audit-tool
AUDIT_SERVICE ?= pypi
audit: $(STAMP)
	@test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit; }
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+[A-Za-z0-9.]*$$//' > $(VENV)/audit-requirements.txt
	@rm -f $(VENV)/audit.json
	-$(AUDIT_VENV)/bin/pip-audit --requirement $(VENV)/audit-requirements.txt --no-deps --disable-pip \
		--vulnerability-service $(AUDIT_SERVICE) --format json --output $(VENV)/audit.json --progress-spinner off
	$(PY) .ci/audit_check.py $(VENV)/audit.json

clean:
	rm -rf runs data/generated
