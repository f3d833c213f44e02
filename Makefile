# The two commands of the README:
#   make serve   set up .venv (first run only) and start the server on :8080
#   make test    set up .venv (first run only) and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: serve test lint setup browser bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# the CPU build of torch first, so nothing pulls the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,llm]"
	$(BIN)/pip check
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/avatar serve --host $(HOST) --port $(PORT)

# Debian's chromium for the browser tests; installed when missing and we can.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null \
		|| echo "chromium could not be installed: browser tests will skip"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check server realtime engines trt_build tests bench
	$(BIN)/mypy server realtime engines trt_build

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.portrait_render
	$(BIN)/python -m bench.live
