# Parallel autoresearch. `make` (or `make help`) lists the targets.
#
# Variables: AR_PROFILE=full|tiny|smoke (default: full on CUDA, tiny on CPU), DATA=offline|climbmix
# (default: the profile's own), PYTHON=python3 (the interpreter that builds .venv).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# User-supplied values reach recipes only as environment variables, expanded by the shell inside
# double quotes, so a value with quotes, `;` or `$(...)` is data, never a command.
export DATA

# Reproduce the pinned install whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: error: $(PYTHON) not found; install Python >= 3.11" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: error: Python >= 3.11 required ($(PYTHON) is older)" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	@touch $@

.PHONY: help
help: ## show this help
	@echo "Parallel autoresearch -- targets:"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24
	@echo
	@echo "Variables: AR_PROFILE=full|tiny|smoke  DATA=offline|climbmix  (defaults: full+climbmix on CUDA, tiny+offline on CPU)"
	@echo "Knob overrides for train: AR_<KNOB>=value, e.g. AR_MATRIX_LR=0.05 AR_DEPTH=10 make train"

.PHONY: setup
setup: $(STAMP) ## create .venv with the pinned dependencies (idempotent)

.PHONY: prepare
prepare: $(STAMP) ## download/build data and train the tokenizer (idempotent; DATA=offline|climbmix)
	$(PY) prepare/prepare.py $${DATA:+--data "$$DATA"}

.PHONY: train
train: prepare ## run one experiment locally; output to stdout and run.log
	$(PY) trainer/train.py 2>&1 | tee run.log

.PHONY: test
test: $(STAMP) ## run the test suite (CPU only, offline)
	$(PY) -m pytest -q tests

.PHONY: lint
lint: $(STAMP) ## shellcheck every shell script and ruff the Python
	$(VENV)/bin/ruff check .
	@files=$$(git ls-files '*.sh' .ci/run); if [ -n "$$files" ]; then echo "shellcheck $$files"; $(VENV)/bin/shellcheck $$files; fi

.PHONY: clean
clean: ## remove caches and run outputs (keeps .venv, data cache and results.tsv)
	rm -rf .pytest_cache .ruff_cache run.log
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
