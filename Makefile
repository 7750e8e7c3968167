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
# double quotes, so a value with quotes, `;` or `$(...)` is data, never a command. $(value ...) keeps
# make itself from expanding a `$(...)` inside the value.
override PREPARE_DATA := $(value DATA)
export PREPARE_DATA

# Reproduce the pinned install whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: error: $(PYTHON) not found; install Python >= 3.11" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: error: Python >= 3.11 required ($(PYTHON) is older)" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > $(VENV)/requirements.txt
	@echo "setup: installing the pinned dependencies into $(VENV) (about a minute the first time)" >&2
	@$(PY) -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt >&2
	@touch $@

.PHONY: help
help: ## show this help
	@echo "Parallel autoresearch -- targets:"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24
	@echo
	@echo "Variables: AR_PROFILE=full|tiny|smoke  DATA=offline|climbmix  (defaults: full+climbmix on CUDA, tiny+offline on CPU)"
	@echo "Settings: README.md, 'Settings' (one table)"

.PHONY: setup
setup: $(STAMP) ## create .venv with the pinned dependencies (idempotent)

.PHONY: prepare
prepare: $(STAMP) ## download/build data and train the tokenizer (idempotent; DATA=offline|climbmix)
	@$(PY) prepare/prepare.py $${PREPARE_DATA:+--data "$$PREPARE_DATA"}

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

# Round driver inputs: K, BACKEND, TAG, SWEEP, REPEATS, DETACH, TIMEOUT, TOP. Taken with $(value ...) so that even a value
# containing `$(...)` stays literal data, and handed to the recipes only as exported environment
# variables (AR_ROUND_*) that the shell expands inside double quotes; tools/round.py validates them.
override AR_ROUND_K := $(value K)
override AR_ROUND_BACKEND := $(value BACKEND)
override AR_ROUND_TAG := $(value TAG)
override AR_ROUND_SWEEP := $(value SWEEP)
override AR_ROUND_REPEATS := $(value REPEATS)
override AR_ROUND_DETACH := $(value DETACH)
override AR_ROUND_TIMEOUT := $(value TIMEOUT)
override AR_ROUND_TOP := $(value TOP)
export AR_ROUND_K AR_ROUND_BACKEND AR_ROUND_TAG AR_ROUND_SWEEP AR_ROUND_REPEATS AR_ROUND_DETACH AR_ROUND_TIMEOUT AR_ROUND_TOP
# The local backend reads this machine's data cache: prepare it first (a no-op when it is there).
LOCAL_DATA = if [ -z "$$AR_ROUND_BACKEND" ] || [ "$$AR_ROUND_BACKEND" = local ]; then $(PY) prepare/prepare.py >&2; fi

.PHONY: round
round: $(STAMP) ## one round: K=4 candidate commits in parallel [BACKEND=local|vessl|sky|modal TAG=.. SWEEP="KNOB=v1,v2" DETACH=1]
	@$(LOCAL_DATA)
	@$(PY) tools/round.py round --k="$$AR_ROUND_K" --backend="$$AR_ROUND_BACKEND" --tag="$$AR_ROUND_TAG" --sweep="$$AR_ROUND_SWEEP" --detach="$$AR_ROUND_DETACH"

.PHONY: round-wait
round-wait: $(STAMP) ## wait at most TIMEOUT=100 s for the tag's round or baseline: exit 0 and its table once done [TAG=..]
	@$(PY) tools/round.py wait --tag="$$AR_ROUND_TAG" --timeout="$$AR_ROUND_TIMEOUT"

.PHONY: baseline
baseline: $(STAMP) ## run the best unchanged REPEATS=4 times: more runs for the noise sigma [BACKEND=.. TAG=.. DETACH=1]
	@$(LOCAL_DATA)
	@$(PY) tools/round.py baseline --repeats="$$AR_ROUND_REPEATS" --backend="$$AR_ROUND_BACKEND" --tag="$$AR_ROUND_TAG" --detach="$$AR_ROUND_DETACH"

.PHONY: status
status: $(STAMP) ## unfinished rounds (jobs, driver running or not, how to resume); the best and the noise [TAG=..]
	@$(PY) tools/round.py status --tag="$$AR_ROUND_TAG"

.PHONY: results
results: $(STAMP) ## the last rounds of results.tsv as a table [TAG=..]
	@$(PY) tools/results.py show --tag="$$AR_ROUND_TAG"

.PHONY: plot
plot: $(STAMP) ## progress.png: every experiment a point, kept ones highlighted, the best as a line
	@$(PY) tools/plot.py --tag="$$AR_ROUND_TAG"

.PHONY: promote
promote: $(STAMP) ## re-run the TOP=2 best commits of a tag on another setting, e.g. AR_GPU=H200 BACKEND=sky [TAG=..]
	@$(PY) tools/round.py promote --top="$$AR_ROUND_TOP" --backend="$$AR_ROUND_BACKEND" --tag="$$AR_ROUND_TAG" --detach="$$AR_ROUND_DETACH"

# Modal backend (modal/README.md): deploys the app that modal/submit-async.sh spawns experiments on.
# Its settings are read by modal/app.py from AR_MODAL_GPU (default H100!; H100:8, or a fallback list
# H100!,A100-80GB), AR_MODAL_APP, AR_MODAL_VOLUME, AR_MODAL_TIMEOUT_S; kept literal, as above.
modal-deploy: override export AR_MODAL_GPU := $(value AR_MODAL_GPU)
modal-deploy: override export AR_MODAL_APP := $(value AR_MODAL_APP)
modal-deploy: override export AR_MODAL_VOLUME := $(value AR_MODAL_VOLUME)
modal-deploy: override export AR_MODAL_TIMEOUT_S := $(value AR_MODAL_TIMEOUT_S)

.PHONY: modal-deploy
modal-deploy: $(STAMP) ## deploy modal/app.py to Modal (after `modal setup`) [AR_MODAL_GPU=H100!|H100:8|..]
	$(VENV)/bin/modal deploy modal/app.py

.PHONY: clean
clean: ## remove caches and run outputs (keeps .venv, data cache and results.tsv)
	rm -rf .pytest_cache .ruff_cache run.log
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
