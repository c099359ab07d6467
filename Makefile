# HEFT Studio: `make run` installs everything and starts the app; `make test` installs and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint browser worker clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# Two packages whose declared dependencies must not be installed (see requirements-nodeps.txt).
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Debian's chromium for the browser tests (never a browser download). Needs root or sudo.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

run: install
	$(BIN)/python app.py

worker: install
	$(BIN)/python -m app.worker

test: install browser
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not browser and not ray"

# ruff, configured in pyproject.toml (line length 120; pycodestyle, pyflakes, import order).
lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
