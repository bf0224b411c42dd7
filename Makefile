# Two commands do all the set-up: `make run` and `make test`.
# The venv is (re)installed only when the requirements files or pyproject.toml change: the
# stamp's name is a hash of their contents. The project itself is installed editable, so
# `import mmcore` and the console scripts (mmcore-app, mmcore-index, mmcore-train) work from
# any folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-offline.txt pyproject.toml | sha256sum | cut -c1-16)
DEV_HASH := $(shell cat requirements.txt requirements-offline.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.stamp-runtime-$(REQ_HASH)
DEV_STAMP := $(VENV)/.stamp-dev-$(DEV_HASH)
KIT ?= offline
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test bench clean venv

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-offline.txt
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.stamp-runtime-*
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.stamp-dev-*
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(PY) app.py --kit $(KIT) --host $(HOST) --port $(PORT)

test: $(DEV_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
