# Two commands for a newcomer: `make demo` runs the pipeline, `make test` runs the tests.
# Both install what they need (Debian packages, FerretDB, a virtualenv) and start the services.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench services services-down venv clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

services:
	scripts/services up

services-down:
	scripts/services down

demo: venv services
	scripts/demo

test: venv services
	$(PY) -m pyflakes *.py tests/*.py $(wildcard bench/*.py)
	$(PY) -m pytest

bench: venv services
	$(PY) bench/ingest.py
	$(PY) bench/query.py
	$(PY) bench/live.py

clean:
	scripts/services reset
	rm -rf $(VENV)
