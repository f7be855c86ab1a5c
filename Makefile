# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with pip when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint check-java clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# an editable install leaves servekit uncompiled: compile it as a regular install does (faster CLI start-up)
	$(BIN)/python -m compileall -q servekit
	touch $(STAMP)

check-java:
	@command -v java >/dev/null 2>&1 || { \
		echo "Java 11+ not found: TorchServe's frontend needs it. Install a JDK (e.g. apt-get install openjdk-17-jre-headless)."; \
		exit 1; }
	@major=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1); \
	if [ -z "$$major" ] || [ "$$major" -lt 11 ]; then \
		echo "Java $$major found, TorchServe needs Java 11+: install a newer JDK."; exit 1; fi

demo: check-java $(STAMP)
	bash scripts/demo.sh

test: check-java $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check servekit handlers tests
	$(BIN)/ruff format --check servekit handlers tests

clean:
	rm -rf .servekit model_store/work model_store/*.mar model_store/catalog.json
