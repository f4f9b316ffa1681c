# Two entry points: `make demo` (set up, run the demo sweep, report it) and `make test`.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,export]'
	touch $@

.PHONY: install demo test test-long bench images
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/bnew sweep run demo --local
	$(VENV)/bin/bnew sweep report demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

test-long: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m long

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench

# The README's screenshots (docs/img/) from a real run of the demo (needs Debian's chromium), and
# docs/compare-runs.ipynb executed again with its outputs and plot.
images: $(VENV)/.installed
	$(VENV)/bin/python docs/make_images.py
	$(VENV)/bin/python docs/notebooks.py
