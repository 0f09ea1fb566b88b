# `make demo` and `make test` each set up .venv on a fresh machine (idempotent), then run.
# torch is pinned for dev/CI in constraints.txt (the only place); pyproject.toml keeps a range.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
export OMP_NUM_THREADS ?= 1

.PHONY: demo test setup bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,rewards]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stagerl train

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/algo_overhead.py
	$(PY) benchmarks/rollout.py

clean-venv:
	rm -rf $(VENV)
