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
# Triton's real C++ onnxruntime/pytorch backends (scripts/build_backends.sh, into .backends/):
# BACKEND_SOURCE=<folder with the r24.10 sources> (default ../shared/reference/triton-backends-r24.10).
BACKEND_SOURCE ?=
BUILD_BACKENDS := bash scripts/build_backends.sh --venv $(VENV) $(if $(BACKEND_SOURCE),--source $(BACKEND_SOURCE),)

.PHONY: venv helical-venv backends backends-optional export serve demo test bench bench-full clean
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $@

helical-venv: $(HELICAL_VENV)/.installed
$(HELICAL_VENV)/.installed: scripts/setup_helical_venv.sh
	bash scripts/setup_helical_venv.sh $(HELICAL_VENV)
	touch $@

# cheap when current (the script compares a stamp); `backends` fails without sources, the optional
# variant (demo, serve, bench) warns and leaves the servers on the Python stand-ins
backends: venv
	$(BUILD_BACKENDS)

backends-optional: venv
	$(BUILD_BACKENDS) --optional

export: venv
	$(GFTRITON) export --repository $(REPOSITORY) $(MODEL_ARGS)

serve: venv backends-optional
	$(GFTRITON) serve --repository $(REPOSITORY)

demo: venv backends-optional
	$(GFTRITON) demo --repository $(REPOSITORY) $(MODEL_ARGS)

# the tests serve through the real backends (GFTRITON_BACKENDS=real: a fallback to stand-ins is an error)
test: venv helical-venv backends
	bash scripts/setup_oracle_env.sh .oracle-overlay $(HELICAL_VENV)/bin/python  # upstream ISP oracle (idempotent)
	GFTRITON_BACKENDS=real GFTRITON_HELICAL_PYTHON=$(abspath $(HELICAL_VENV))/bin/python $(PY) -m pytest $(PYTEST_ARGS)

bench: venv backends-optional
	$(GFTRITON) bench --mode quick

bench-full: venv helical-venv backends-optional
	GFTRITON_HELICAL_PYTHON=$(abspath $(HELICAL_VENV))/bin/python $(GFTRITON) bench --mode full

clean:
	rm -rf $(VENV) $(HELICAL_VENV) .backends results .pytest_cache
	git clean -fdX $(REPOSITORY)
