# Two commands do all set-up: `make book` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qlib-installed
PROFILE ?= full
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt
export QLIB_CACHE ?= $(CURDIR)/.qlib-cache

.PHONY: setup sysdeps book notebooks html pdf check test lab run lint clean

setup: sysdeps $(STAMP)

sysdeps:
	@bash tools/sysdeps.sh

# Re-installs only when the dependency files change, so repeated runs are fast.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[book,dev,bench]'
	@touch $@

book: notebooks html

notebooks: setup
	$(BIN)/python -m qlib.book run --profile $(PROFILE)

html: setup
	$(BIN)/jupyter-book build . --builder html
	@echo "The book is in _build/html/index.html"

# The PDF book (LaTeX) from the notebooks `make book` executed; copied into _build/html.
pdf: setup
	$(BIN)/python -m qlib.book pdf

# Reads the built HTML book in headless Chromium, offline; screenshots in _build/screenshots.
check: setup
	$(BIN)/python -m qlib.book check _build/html

# Lint first: CI enforces one formatting and ruff's checks before running any test.
# Two workers, one torch thread each, a test file per worker at a time, the files in the order
# tests/conftest.py gives (the two files of notebook runs first): on 2 cores the serial run kept
# one core idle while a notebook's kernel ran, and two 2-thread workers would oversubscribe.
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder --durations=15

lab: setup
	$(BIN)/jupyter lab notebooks/

# make run NB=notebooks/x.ipynb PARAMS="-p key value"
run: setup
	@test -n "$(NB)" || { echo "usage: make run NB=notebooks/x.ipynb PARAMS='-p key value'"; exit 2; }
	$(BIN)/papermill "$(NB)" "book/nb/$(notdir $(NB))" --cwd notebooks -k python3 $(PARAMS)

lint: setup
	$(BIN)/ruff check qlib tests benchmarks tools
	$(BIN)/ruff format --check qlib tests benchmarks tools

clean:
	rm -rf _build book/nb book/_generated
