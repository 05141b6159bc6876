# Two entry points that do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CI pins the CPU build of torch that lies on local disk; on a GPU machine with torch already
# installed, set TORCH_SPEC= (empty) to keep the existing build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo sweep-demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Builds the demo corpus and tokenizer (cached under .cache/), trains the tiny DyT model from
# scratch on CPU in runs/demo (a few minutes on 2 cores), then evaluates it zero-shot on the
# bundled offline task.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/megatron-dyt train configs/tiny-dyt.yaml --run-dir runs/demo
	HF_DATASETS_OFFLINE=1 $(VENV)/bin/megatron-dyt eval runs/demo --suite offline

# The tiny α₀ sweep (configs/sweeps/tiny.yaml: 24 runs of 60 steps, two at a time) into
# runs/sweep-demo, then its report in runs/sweep-demo/report (about 6 minutes on 2 idle cores).
# Running it again resumes: finished runs are skipped.
sweep-demo: install
	$(VENV)/bin/megatron-dyt sweep run configs/sweeps/tiny.yaml --out runs/sweep-demo --parallel 2
	$(VENV)/bin/megatron-dyt sweep report runs/sweep-demo

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
