# The commands the README names. Each creates or reuses .venv and installs with constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed

.PHONY: install serve test lint mutants models bench bench-recipe bench-stages bench-distill bench-search serve-shapes gpu-check clean

# Serving needs only the core install (no torch, Ray or browsers); everything else adds the extras.
$(SERVE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/flowmap serve --bundle models/digits --host 127.0.0.1 --port 8000

# The embedded text-to-image model: prompts such as "a small red circle left of a blue square"
serve-shapes: $(SERVE_STAMP)
	$(VENV)/bin/flowmap serve --bundle models/shapes --host 127.0.0.1 --port 8001

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two workers (pytest-xdist) of one torch thread each, each taking whole modules: one worker's Python (exports, imports,
# servers starting) runs while the other computes, 30% less time than one process of two threads on CI's two cores.
# They share the session fixtures that take long to build (tests/conftest.py) and take turns at Ray (tests/serving.py).
TEST_WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Plausible mistakes in the maths and the serving path, each applied to a copy of the tree: every one
# must make a test fail (scripts/mutants.py lists them and the tests that see them).
mutants: $(STAMP)
	$(PY) scripts/mutants.py

# digits (about 10 min), then shapes: CLIP, oracle, text-to-image teacher, FreeFlow, export (the last full run took 55 min with a 2500-step student; its 7500 steps now add about 35)
models: $(STAMP)
	$(PY) -m flowmap.cli pipeline --recipe digits --runs runs/digits --docs docs --bundle models/digits
	$(PY) -m flowmap.cli pipeline --recipe shapes --runs runs/shapes --docs docs --bundle models/shapes
	$(PY) -m flowmap.cli readme

# What Best-of-N buys at equal NFE on held-out shapes prompts and on digits (needs `make models`' runs/)
bench-search: $(STAMP)
	$(PY) -m flowmap.cli bench search --out docs/search
	$(PY) -m flowmap.cli readme

bench: $(STAMP)
	$(PY) -m flowmap.cli bench serve --bundle models/digits --out docs/serving
	$(PY) -m flowmap.cli bench overload --bundle models/digits --out docs/overload
	$(PY) -m flowmap.cli readme

# Seconds per training step of a few network sizes, to choose one that fits this machine
bench-recipe: $(STAMP)
	$(PY) -m flowmap.cli bench recipe --out docs/recipe
	$(PY) -m flowmap.cli readme

# What each request stage costs at real sizes (random weights), and a real-size latent bundle served;
# the bundle is built under runs/latent-bundle (not committed) the first time (about 15 min in all)
bench-stages: $(STAMP)
	$(PY) -m flowmap.cli bench stages --out docs/stages
	$(PY) -m flowmap.cli readme

# Every method from one teacher (about 22 min), then FSF-DMD's settings from the consistency-distilled
# flow map that run leaves in runs/bench/meanflow (about 14 min). Needs runs/digits from `make models`.
STUDY_INIT := init=runs/bench/meanflow
bench-distill: $(STAMP)
	$(PY) -m flowmap.cli bench distill --minutes 4 --segments 4 --options fsf-dmd:warmup-steps=1400
	$(PY) -m flowmap.cli bench distill --title "FSF-DMD settings, from a consistency-distilled flow map" \
		--runs runs/study --out docs/fsf_dmd_study --minutes 2 --segments 2 \
		--methods cd-continued=meanflow fsf-dmd fsf-dmd-m1=fsf-dmd fsf-dmd-lambda0.2=fsf-dmd \
		          fsf-dmd-ema0.995=fsf-dmd fsf-dmd-sigma1=fsf-dmd \
		--options cd-continued:$(STUDY_INIT) fsf-dmd:$(STUDY_INIT) fsf-dmd-m1:$(STUDY_INIT) fsf-dmd-m1:sim-steps=1 \
		          fsf-dmd-lambda0.2:$(STUDY_INIT) fsf-dmd-lambda0.2:lambda-dm=0.2 \
		          fsf-dmd-ema0.995:$(STUDY_INIT) fsf-dmd-ema0.995:fake-ema-decay=0.995 \
		          fsf-dmd-sigma1:$(STUDY_INIT) fsf-dmd-sigma1:time-shift=1.0
	$(PY) -m flowmap.cli readme

# On a CUDA machine: the gpu-marked tests and `flowmap bench gpu` at real sizes, into gpu-check/
gpu-check: $(STAMP)
	PYTHON=$(PY) scripts/gpu_check.sh gpu-check

clean:
	rm -rf runs .pytest_cache .ruff_cache
