# `make demo` and `make test` each set up .venv on a fresh machine (idempotent), then run.
# torch is pinned for dev/CI in constraints.txt (the only place); pyproject.toml keeps a range.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install
export OMP_NUM_THREADS ?= 1

.PHONY: demo test setup bench gpu-check proxies clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,rewards]'
	# DeepSpeed ships as a source distribution that imports torch while building, hence no
	# build isolation (after torch is in). The engine tests (tests/test_engines.py) need it.
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt 'deepspeed'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stagerl train

# On a fresh machine the first run compiles DeepSpeed's CPU ops once, before the engine tests and
# outside their timeouts (tests/conftest.py; ~12 min measured on a busy 2-core machine, cheaper
# than prebuilding them at install: docs/development.md, "DeepSpeed from source").
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/algo_overhead.py
	$(PY) benchmarks/rollout.py
	$(PY) benchmarks/logprob_memory.py
	$(PY) benchmarks/step.py

# Rebuild the two shipped proxy rewards side by side (one core each) into runs/proxies/ and compare
# them with the shipped weights and cards (docs/rewards.md, "Learned proxy rewards").
proxies: $(STAMP)
	rm -rf runs/proxies
	$(VENV)/bin/stagerl pretrain-reward shapes_detector --threads 1 --no-progress \
		--out runs/proxies/shapes_detector & p1=$$!; \
	$(VENV)/bin/stagerl pretrain-reward shapes_scorer --threads 1 --no-progress \
		--out runs/proxies/shapes_scorer & p2=$$!; \
	wait $$p1 && wait $$p2
	$(PY) scripts/compare_proxies.py runs/proxies

# On a CUDA machine: the engines in bf16, our sampler vs generate(), peak memory at 7B widths
# (scripts/gpu_check.py; writes gpu_check.json). Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --out gpu_check.json

clean-venv:
	rm -rf $(VENV)
