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
	$(VENV)/bin/flowmap serve --bundle models/digits --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

models: $(STAMP)
	$(PY) -m flowmap.cli pipeline --runs runs/digits --docs docs --bundle models/digits
	$(PY) -m flowmap.cli readme

bench: $(STAMP)
	$(PY) -m flowmap.cli bench serve --bundle models/digits --out docs/serving
	$(PY) -m flowmap.cli readme

clean:
	rm -rf runs .pytest_cache .ruff_cache
