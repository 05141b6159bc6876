# Two entry points that do all the set-up on a fresh machine: `make demo` and `make test`.
# While editing, `make test-fast` runs the unit tier alone; `.venv/bin/python -m pytest -m slow`
# (or distributed, slurm, interpreter) runs one other tier (pyproject.toml; README.md, "Tests").
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CI pins the CPU build of torch that lies on local disk; on a GPU machine with torch already
# installed, set TORCH_SPEC= (empty) to keep the existing build.
TORCH_SPEC ?= torch==2.13.0
# Every package's exact version, as CI last passed with it (`make lock` writes it). Installs
# resolve against it, so a fresh machine gets what was tested, not what the registry serves today.
LOCK   := constraints.txt
# Without TORCH_SPEC the machine's own torch build is kept: its line is left out of the lock.
LOCK_USED := $(if $(TORCH_SPEC),$(LOCK),$(VENV)/constraints-no-torch.txt)

.PHONY: install demo sweep-demo study-cpu test test-fast lint lock clean

$(STAMP): pyproject.toml $(LOCK) megatron_dyt/__init__.py  # (the version lives there)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),,grep -v '^torch==' $(LOCK) >$(LOCK_USED))
	$(PY) -m pip install -q -c $(LOCK_USED) --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q -c $(LOCK_USED) "$(TORCH_SPEC)")
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(LOCK_USED) -e ".[dev]"
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

# The α₀ and norm study scaled down for CPUs (configs/studies/alpha-width-cpu.yaml: 18 runs of
# 16 steps, two at a time) into runs/study-cpu, then its report (about 2-3 minutes on 2 cores).
study-cpu: install
	$(VENV)/bin/megatron-dyt sweep run configs/studies/alpha-width-cpu.yaml --out runs/study-cpu --parallel 2
	$(VENV)/bin/megatron-dyt sweep report runs/study-cpu

# Every tier (what CI runs).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The unit tier: no multi-process, SLURM, Triton-interpreter or slow test (about a minute on 2
# cores), with its slowest tests listed so that one that grows can be moved to `slow`.
FAST := not distributed and not slurm and not interpreter and not slow
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "$(FAST)" --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Re-resolve every dependency from pyproject.toml's ranges in a scratch venv and write the lock.
# Then `make test` (it reinstalls from the new lock) and commit pyproject.toml and constraints.txt
# together; raise pyproject's upper bounds to what was tested when a newer release is wanted.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)")
	DS_BUILD_OPS=0 .venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Exact versions of every package, written by \`make lock\` on $$(date -u +%F) with"; \
	  echo "# $$(.venv-lock/bin/python -V) on $$(uname -m): what \`make install\` resolves against."; \
	  echo "# torch's local build label (+cpu, +cu130) is dropped so the line matches any build."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f; } >$(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) runs .pytest_cache
