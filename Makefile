# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOWEST := .venv-hf-lowest
LOWEST_STAMP := $(LOWEST)/.installed

# A non-editable install (a built wheel, package data included) in its own venv: the wheel
# test runs `retnet eval` and `retnet compare --quick` from it outside the repository.
WHEEL := .venv-wheel
WHEEL_STAMP := $(WHEEL)/.installed

.PHONY: demo test test-fast test-hf-lowest wheel kernels cross-tools lint bench mutations clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The C++ kernels, compiled once per machine and torch build into ~/.cache/retnet (seconds when
# already there); at first use otherwise. Never through pip's build isolation. Every variant
# this CPU runs (native, and the narrower x86 builds the tests also check), two at a time.
kernels: $(STAMP)
	$(BIN)/python -m retnet.kernels.build

demo: $(STAMP) kernels
	$(BIN)/retnet demo

# The whole suite on the newest pinned versions, then the transformers integration again on
# the lowest supported transformers. Two pytest workers (pytest-xdist): most tests are small
# tensors and Python, which one process leaves a core idle on (7.5 → 6.1 min on 2 cores).
test: $(STAMP) $(LOWEST_STAMP) wheel kernels cross-tools
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -n 2
	$(LOWEST)/bin/python -m pytest -q tests/hf/test_hf.py tests/hf/test_hf_export.py

# The inner loop: everything but the end-to-end runs of tools (tests marked `slow`: commands,
# benchmarks, the installed package), in under two minutes on two cores.
test-fast: $(STAMP) kernels
	$(BIN)/python -m pytest -q -m "not slow"

$(LOWEST_STAMP): pyproject.toml constraints-hf-lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --disable-pip-version-check -c constraints-hf-lowest.txt \
		-e '.[train]' pytest transformers
	touch $(LOWEST_STAMP)

# Dependencies once; the package itself rebuilt from the tree on every run (seconds), so the
# wheel test always sees the current code. Build isolation fetches only setuptools and wheel.
$(WHEEL_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(WHEEL)
	$(WHEEL)/bin/pip install -q --disable-pip-version-check -c constraints.txt '.[train,hf,eval]'
	touch $(WHEEL_STAMP)

wheel: $(WHEEL_STAMP)
	$(WHEEL)/bin/pip install -q --disable-pip-version-check --no-deps --force-reinstall .
	rm -rf build

test-hf-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -m pytest -q tests/hf/test_hf.py tests/hf/test_hf_export.py

# The aarch64 cross compiler and user-mode qemu with which tests/kernels/test_kernels_cross.py builds and
# runs the kernels' NEON back end (Debian's packages), installed only where either is missing.
cross-tools:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "cross-tools: no apt-get here; install" \
	    "aarch64-linux-gnu-g++ and qemu-aarch64 yourself" >&2; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    g++-aarch64-linux-gnu qemu-user; }

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# Planted bugs (tests/mutations/*.patch), each applied to a temporary copy: all must be killed.
mutations: $(STAMP)
	$(BIN)/python scripts/mutations.py

bench: $(STAMP)
	$(BIN)/python benchmarks/forms.py

clean:
	rm -rf $(VENV) $(LOWEST) $(WHEEL) build src/*.egg-info .pytest_cache .ruff_cache
