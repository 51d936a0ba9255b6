# unclip_lite: the two commands are `make course` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The install stamp is keyed on pyproject.toml: a second `make test` starts at once, and a
# changed pyproject reinstalls.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install browser course test test-fast lab bench example-data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

## Run every notebook headless, in order, into build/executed/ (prints a summary table).
course: install
	$(PY) -m unclip_lite course

## The whole suite: unit tests, then every notebook at its course defaults.
test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

## What the browser test (tests/test_browser.py) drives: Debian's chromium, installed as root with
## apt-get when missing. Elsewhere nothing is installed and that one test skips, saying why.
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (apt-get) for the browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
	      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	  else echo "no chromium, and not root with apt-get: tests/test_browser.py will skip"; fi; \
	fi

## The quick subset (no notebook runs, no course-scale training).
test-fast: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

## JupyterLab on notebooks/.
lab: install
	$(VENV)/bin/jupyter lab notebooks/

## Speed benchmarks (not part of make test); results go to build/bench/.
bench: install
	$(PY) benchmarks/bench_shapes.py
	$(PY) benchmarks/bench_precision.py
	$(PY) benchmarks/bench_clip.py
	$(PY) benchmarks/bench_decoder.py
	$(PY) benchmarks/bench_samplers.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_widgets.py

## Regenerate the tiny example dataset in data/example/.
example-data: install
	$(PY) scripts/make_example_data.py

clean:
	rm -rf build .pytest_cache
