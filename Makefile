# The commands the README names. Each creates or reuses .venv and installs with constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lint models bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	@echo "flowmap serve is not yet built (see the server issue)"; exit 1

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

models: $(STAMP)
	$(PY) -m flowmap.cli pipeline --runs runs/digits --docs docs

bench: $(STAMP)
	@echo "flowmap bench is not yet built"; exit 1

clean:
	rm -rf runs .pytest_cache .ruff_cache
