# The two commands of the README. Each creates or refreshes the virtual environment in .venv
# (only when pyproject.toml changed), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint browser postgres bench clean

# The demo needs the runtime dependencies only; the tests add the dev extras.
$(BIN)/.venv-created:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "image-runner needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.venv-created
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: pyproject.toml $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/image-runner run jobs/demo.yaml --emulate
	$(BIN)/image-runner run jobs/catalog.csv --emulate
	$(BIN)/image-runner run jobs/matrix.yaml --emulate

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check runner tests bench
	$(BIN)/ruff format --check runner tests bench
	$(BIN)/mypy

# The report's test opens it in a real headless browser: Debian's Chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Chromium for the report's browser test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	}

# The scale-out tests start their own PostgreSQL cluster (initdb in a temp folder): Debian's.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing PostgreSQL for the scale-out tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	}

test: lint browser postgres
	$(BIN)/pytest -q -n 3

# Not part of `make test`: about 30 minutes on 2 cores. `python -m bench --quick` for a smoke pass.
bench: $(BIN)/.installed-dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) output/*/
