# Front door: `make demo` and `make test` on a fresh clone. Everything installs into ignored folders.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	bash scripts/setup_venv.sh $(VENV)
	touch $@

test: venv
	$(PY) -m pytest -q
