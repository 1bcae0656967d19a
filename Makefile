# Two commands on a fresh machine: `make demo`, `make test`.  `make bench` for numbers.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-quick deps clean

deps: $(STAMP)

$(STAMP): pyproject.toml .ci/install-deps binding/install binding/pyfuse3-3.5.0-clusterfs.patch
	./.ci/install-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	./binding/install $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: deps
	$(PY) -m clusterfs.commands.demo

test: deps
	$(PY) -m pytest -q -m "not slow" tests

test-slow: deps
	$(PY) -m pytest -q -m slow tests

bench: deps
	$(PY) benchmarks/run_all.py

bench-quick: deps
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
