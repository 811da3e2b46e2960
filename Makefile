# kiln: `make test` runs the test suite, `make demo` runs the whole pipeline on a built-in corpus on CPU.
# Both create .venv on first use. Python 3.10+ is the only thing the machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-demo

venv: $(STAMP)

# Installing torch==2.13.0 first keeps any other package from pulling a different torch build.
$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	@echo "make demo arrives with the demo issue (#7)"; exit 1
