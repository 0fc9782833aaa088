#!/usr/bin/env bash
# The wheels the GPU machine (nvidia-h200: Python 3.12, torch 2.11, transformers 5.17, no
# network) lacks for minima and bench/mfu.py, into the ignored folder .whl/ that a device `run`
# carries (bench/gpu_checks.sh installs them there). Run HERE, from anywhere in the checkout:
#
#   bash bench/gpu_wheels.sh            # minima's missing dependencies + TRL (the TRL side)
#   bash bench/gpu_wheels.sh --no-trl   # without TRL: then bench/mfu.py runs with --skip-trl
#
# What the machine lacks (/work/.library/device/KINDS.md, its package list): deepspeed and its
# hjson and pydantic (pydantic-core, annotated-types, typing-inspection), datasets (dill,
# multiprocess), gguf, trl. typing_extensions travels too (pydantic-core wants a recent one), and
# typer, click and rich: the machine has them in versions not known here, and minima's CLI and
# progress bars are tested with these.
# Versions are this checkout's .venv's, so the device runs what the tests here ran. DeepSpeed has
# no wheel on PyPI: its sdist is built here with DS_BUILD_OPS=0 (no compiled ops; ZeRO-2/3 with
# minima's torch AdamW needs none). Prints each wheel's size, the total and the total with the
# working tree: a device `run` carries 64 MiB at most.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=.venv/bin/python
WITH_TRL=1
case "${1:-}" in
  --no-trl) WITH_TRL=0 ;;
  "") ;;
  *) echo "error: unknown option $1 (use --no-trl or nothing)" >&2; exit 2 ;;
esac

exclude=.git/info/exclude
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

names=(hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions
       datasets dill multiprocess gguf typer click rich)
((WITH_TRL)) && names+=(trl)

rm -rf .whl && mkdir -p .whl
specs=()
for name in "${names[@]}"; do specs+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${specs[@]}"

# DeepSpeed: the sdist built into a pure-python wheel against this venv's torch (its setup.py
# imports torch), no ops compiled
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
  -w .whl "deepspeed==$(version deepspeed)"

ls -l .whl | awk 'NR > 1 {printf "  %10d  %s\n", $5, $9}'
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
  | awk '/\ttotal$/ {s += $1} END {print s + 0}')
total=$((wheels + tree + untracked))
awk -v w="$wheels" -v t="$tree" -v u="$untracked" -v a="$total" 'BEGIN {m = 1048576
  printf "wheels %.1f MiB, tracked tree %.1f MiB, untracked %.1f MiB: %.1f MiB of the 64 MiB\n",
    w / m, t / m, u / m, a / m}'
if ((total > 64 * 1048576)); then
  echo "error: over the 64 MiB a device run carries; try --no-trl" >&2
  exit 1
fi
