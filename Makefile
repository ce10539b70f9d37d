# maclustr: `make demo` runs the gateway in front of real local MLX servers; `make test` runs
# the tests. Both create .venv and install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean system-deps

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) demo/run.py

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# nginx (the reverse-proxy test) and chromium (the front-page browser test) come from the
# distribution. Installed when missing and apt-get can run (root or passwordless sudo);
# elsewhere those tests skip and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing ) \
	    >/dev/null 2>&1 || echo "could not install$$missing: their tests will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy maclustr

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis

# --- deploy onto the nodes named in routes.yaml's `nodes:` (see deploy/README.md) ----------
# make deploy [DRY_RUN=1] [ROUTES=routes.yaml] [SSH=ssh] [RSYNC=rsync]; make status; make logs
ROUTES ?= routes.yaml
SSH ?= ssh
RSYNC ?= rsync
DRY_RUN ?=
DEPLOY_STATE ?= .deploy
LOG_LINES ?= 50
DEPLOY_SOURCE ?= .
DEPLOY := $(PY) deploy/deploy.py --routes '$(ROUTES)' --state '$(DEPLOY_STATE)' \
	--source '$(DEPLOY_SOURCE)' \
	--ssh '$(SSH)' --rsync '$(RSYNC)' $(if $(filter-out 0 no false,$(DRY_RUN)),--dry-run)

.PHONY: deploy status logs

deploy: $(STAMP)
	$(PY) -m maclustr check --routes '$(ROUTES)'
	$(DEPLOY) deploy

status: $(STAMP)
	$(DEPLOY) status

logs: $(STAMP)
	$(DEPLOY) logs --lines $(LOG_LINES)

# Side-by-side benchmark (issue 6): direct, nginx, caddy, litellm, maclustr; < 8 min.
# Writes bench/results/latest.{md,json}. Options: make bench BENCH_ARGS="--quick".
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)
