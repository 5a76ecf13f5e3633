# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# constraints.txt pins torch to the CPU build that lies on disk; pyproject.toml declares
# the range the library supports.
PIP := $(BIN)/pip install --quiet -c constraints.txt
STAMP := $(VENV)/.installed
# Programs the tests drive as a reader would (pdftoppm renders report pages, chromium opens
# the HTML report); Debian packages.
TOOLS := $(VENV)/.tools
DEBS := poppler-utils chromium

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/samplescope demo --out samplescope-demo/

$(TOOLS): Makefile
	(command -v pdftoppm && command -v chromium) >/dev/null || (apt-get update -qq && apt-get install -y -qq $(DEBS))
	touch $(TOOLS)

test: $(STAMP) $(TOOLS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(PIP) -e '.[test,bench]'
	# BackPACK requires torchvision (only its examples import it); the registry's build does
	# not import beside the CPU torch and would break transformers' imports in the tests.
	$(BIN)/pip uninstall -y -q torchvision
	$(BIN)/python bench/recorder_overhead.py
	$(BIN)/python bench/analysis_speed.py
	command -v h5repack >/dev/null || (apt-get update -qq && apt-get install -y -qq hdf5-tools)
	$(BIN)/python bench/trace_size.py

clean:
	rm -rf $(VENV) samplescope-demo
