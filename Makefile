# The two commands of the README: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VMFERRY := $(VENV)/bin/vmferry
STAMP := $(VENV)/.installed

.PHONY: demo test unit functional install system-deps venv lint bench clean-lab

install: system-deps venv image

system-deps:
	bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

image: venv
	VMFERRY_STATE_DIR=$${VMFERRY_STATE_DIR:-/var/lib/vmferry} $(PY) -c "from vmferry.image.builder import ensure_image; print(ensure_image())"

demo: install
	$(PY) scripts/demo.py

# Both test stages run on two pytest-xdist workers (VMFERRY_TEST_WORKERS=1: one process).
unit: venv
	bash scripts/test.sh unit

# Prints the 25 slowest tests (--durations=25 in scripts/test.sh).
functional: install
	bash scripts/test.sh functional

test: install
	bash scripts/test.sh

lint: venv
	bash scripts/test.sh lint

bench: install
	$(VMFERRY) bench migration

# vmferry against OVN, side by side, from a fresh state (its own lab, removed before and after).
bench-ovn: install
	$(VMFERRY) lab down --lab benchovn >/dev/null 2>&1 || true
	$(VMFERRY) bench migration --peer ovn --runs 10 --lab-name benchovn -o bench-results/migration-ovn.json

clean-lab: venv
	$(VMFERRY) lab down || true
