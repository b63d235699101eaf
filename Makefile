# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOWEST := .venv-hf-lowest
LOWEST_STAMP := $(LOWEST)/.installed

.PHONY: demo test test-hf-lowest lint bench mutations clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/retnet demo

# The whole suite on the newest pinned versions, then the transformers integration again on
# the lowest supported transformers.
test: $(STAMP) $(LOWEST_STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q
	$(LOWEST)/bin/python -m pytest -q tests/test_hf.py tests/test_hf_export.py

$(LOWEST_STAMP): pyproject.toml constraints-hf-lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --disable-pip-version-check -c constraints-hf-lowest.txt \
		-e '.[train]' pytest transformers
	touch $(LOWEST_STAMP)

test-hf-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -m pytest -q tests/test_hf.py tests/test_hf_export.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# Planted bugs (tests/mutations/*.patch), each applied to a temporary copy: all must be killed.
mutations: $(STAMP)
	$(BIN)/python scripts/mutations.py

bench: $(STAMP)
	$(BIN)/python benchmarks/forms.py

clean:
	rm -rf $(VENV) $(LOWEST) build src/*.egg-info .pytest_cache .ruff_cache
