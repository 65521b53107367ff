# Front door. On a fresh clone: `make demo` (sets everything up, runs the main job, prints a summary)
# and `make test` (the whole suite). Everything installs into ignored folders (.venv, .venv-helical).
SHELL := /bin/bash
VENV ?= .venv
HELICAL_VENV ?= .venv-helical
PY := $(VENV)/bin/python
GFTRITON := $(VENV)/bin/gftriton
REPOSITORY ?= model_repository
# Model selection for export/demo: a helical model name, or MODEL_DIR=<checkpoint folder>,
# DICTIONARIES=<folder with token_dictionary.json ...>, CACHE_DIR=<helical cache prefix>.
MODEL ?= gf-6L-10M-i2048
MODEL_DIR ?=
DICTIONARIES ?=
CACHE_DIR ?=
MODEL_ARGS := --model $(if $(MODEL_DIR),$(MODEL_DIR),$(MODEL)) $(if $(DICTIONARIES),--dictionaries $(DICTIONARIES),) \
	$(if $(CACHE_DIR),--cache-dir $(CACHE_DIR),) $(if $(MODEL_DIR)$(DICTIONARIES)$(CACHE_DIR),,--random-weights --vocabulary-from-sample)
PYTEST_ARGS ?=

.PHONY: venv helical-venv export serve demo test bench bench-full clean
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

helical-venv: $(HELICAL_VENV)/.installed
$(HELICAL_VENV)/.installed: scripts/setup_helical_venv.sh
	bash scripts/setup_helical_venv.sh $(HELICAL_VENV)
	touch $@

export: venv
	$(GFTRITON) export --repository $(REPOSITORY) $(MODEL_ARGS)

serve: venv
	$(GFTRITON) serve --repository $(REPOSITORY)

demo: venv
	$(GFTRITON) demo --repository $(REPOSITORY) $(MODEL_ARGS)

test: venv helical-venv
	bash scripts/setup_oracle_env.sh .oracle-overlay $(HELICAL_VENV)/bin/python  # upstream ISP oracle (idempotent)
	GFTRITON_HELICAL_PYTHON=$(HELICAL_VENV)/bin/python $(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(GFTRITON) bench --mode quick

bench-full: venv helical-venv
	GFTRITON_HELICAL_PYTHON=$(HELICAL_VENV)/bin/python $(GFTRITON) bench --mode full

clean:
	rm -rf $(VENV) $(HELICAL_VENV) results .pytest_cache
	git clean -fdX $(REPOSITORY)
