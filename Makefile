# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with pip when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint check-java tools clean

# System tools the test suite drives: `servekit bench --generator wrk` (wrk) and the alert rules' check (promtool,
# from Debian's prometheus package). Installed with apt-get where we are root; elsewhere one line says what to run.
TOOLS := wrk:wrk promtool:prometheus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# an editable install leaves servekit uncompiled: compile it as a regular install does (faster CLI start-up)
	$(BIN)/python -m compileall -q servekit servekit_worker
	touch $(STAMP)

check-java:
	@command -v java >/dev/null 2>&1 || { \
		echo "Java 11+ not found: TorchServe's frontend needs it. Install a JDK (e.g. apt-get install openjdk-17-jre-headless)."; \
		exit 1; }
	@major=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1); \
	if [ -z "$$major" ] || [ "$$major" -lt 11 ]; then \
		echo "Java $$major found, TorchServe needs Java 11+: install a newer JDK."; exit 1; fi

tools:
	@missing=""; for pair in $(TOOLS); do tool=$${pair%%:*}; package=$${pair#*:}; \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing (the tests drive them)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
				|| { echo "apt-get could not install$$missing"; exit 1; }; \
		else \
			echo "The tests need$$missing: run  sudo apt-get install -y$$missing  (or your system's packages), then make test again."; \
			exit 1; \
		fi; \
	fi

demo: check-java $(STAMP)
	bash scripts/demo.sh

test: check-java tools $(STAMP)
	$(BIN)/python -m pytest

# The unit layer alone (no Java, no server): the edit loop. `make test` stays the whole suite and what CI runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check servekit servekit_worker handlers tests scripts
	$(BIN)/ruff format --check servekit servekit_worker handlers tests scripts
	$(BIN)/lint-imports

clean:
	rm -rf .servekit model_store/work model_store/*.mar model_store/catalog.json
