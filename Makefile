# Two commands: `make run` (serve the demo config) and `make test` (the whole suite).
# Each creates or updates .venv on its own. torch is pinned in the same pip command
# as everything that depends on it (constraints.txt): unpinned, pip pulls CUDA builds.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= var/demo
PYTEST_ARGS ?=

.PHONY: install llama-server demo run test lint browser postgres bench doctor clean cluster-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

# llama.cpp's C++ server for the llama-server worker backend, built from the llama.cpp
# sources the pinned llama-cpp-python sdist vendors (one llama.cpp in the project) into
# $(BIN)/llama-server. The script does nothing when the binary is current.
llama-server: $(STAMP)
	scripts/build_llama_server.sh $(VENV)

install: $(STAMP) llama-server

demo: install
	$(BIN)/edison make-demo --out $(DEMO)

run: demo
	$(BIN)/edison serve --config config/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

# The operator page's tests drive Debian's Chromium (with Playwright, from PyPI). Installed
# here when missing and when apt-get can (root, as in CI); otherwise those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the operator page tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null; } \
	  || echo "could not install chromium: the browser tests will be skipped"; }

# The cluster tests start a private PostgreSQL from Debian's package (initdb/pg_ctl in a
# temporary folder, as the 'postgres' user when run as root). Installed here when missing
# and when apt-get can; otherwise those tests are skipped.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the cluster tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql >/dev/null; } \
	  || echo "could not install postgresql: the cluster tests will be skipped"; }

# Two Edison nodes on one private PostgreSQL (var/cluster), on ports 8001 and 8002.
cluster-demo: demo postgres
	$(BIN)/python scripts/cluster_demo.py

test: install lint browser postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: demo
	$(BIN)/python bench/memory_endpoint.py

doctor: $(STAMP)
	$(BIN)/edison doctor

clean:
	rm -rf $(VENV) var outputs .pytest_cache
