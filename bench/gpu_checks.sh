#!/usr/bin/env bash
# Issue 16's GPU checks in one short run on the lent machine (nvidia-h200: one H200, Python 3.12,
# torch 2.11; no deepspeed/trl/datasets/gguf there, no network):
#   (a) nvidia-smi and torch's view of the GPU;
#   (b) bench/mfu.py on the issue's ~1B -> 400M random pair, bf16, on the GPU (goal: minima
#       >= 40 % MFU against the matmul peak measured at the models' shapes);
#   (c) the tiny world and its pruned student (`minima run recipes/tiny.yaml --until prune`),
#       then `minima distill` under torchrun (one process) with DeepSpeed ZeRO-2 and ZeRO-3 on
#       NCCL in bf16: exit codes, first/final loss, the backend seen;
#   (d) tests/integration/test_compile.py is skipped: it pins LocalSession("cpu"), so on that
#       machine it would test CPU inductor, not CUDA.
# Each part has its own time limit, logs to $OUT and runs even when an earlier one failed;
# sized for about 6 minutes on an H200 (an estimate: not yet run there); the parts' limits
# add up to 9 minutes, install and (a) aside.
#
# 1. HERE, once: bash bench/gpu_wheels.sh         (the missing wheels into the ignored .whl/)
# 2. the device tool's run, from a session lent an H200:
#      run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=570)
#    then read $OUT's files (summary.txt first); a warm rerun of one part:
#      run(command="bash bench/gpu_checks.sh --only zero", carry=[".whl"], timeout_s=240)
# CPU rehearsal HERE (tiny sizes, the .venv, gloo, DS_ACCELERATOR=cpu; a few minutes):
#      bash bench/gpu_checks.sh --dry-run        (logs in $OUT, default /tmp/gpu-checks)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
ONLY="gpu,mfu,zero"
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    *) echo "error: unknown option $1 (--dry-run, --only gpu,mfu,zero)" >&2; exit 2 ;;
  esac
  shift
done
wants() { [[ ",$ONLY," == *",$1,"* ]]; }

OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1

if ((DRY)); then
  PY=${PY:-.venv/bin/python}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/minima-torch-extensions}
  DEVICE=cpu
  # the wheels cannot be installed into this 3.11 venv (cp312 tags); a Python 3.12 proves they
  # install together and pydantic imports, where there is one
  py312=""
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    "$candidate" -c "" 2>/dev/null && { py312=$candidate; break; }
  done
  if [[ -n $py312 ]] && ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/gpu-checks-site.XXXXXX)
    "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --root-user-action ignore --target "$site" .whl/*.whl \
      && PYTHONPATH=$site "$py312" -c "import pydantic, hjson, dill; print('wheels install' \
' on Python 3.12: pydantic', pydantic.VERSION)"
    echo "wheels on 3.12: rc $?" >>"$SUMMARY"
    rm -rf "$site"
  fi
else
  PY=${PY:-python3}
  export DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch-extensions
  DEVICE=cuda
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --root-user-action ignore --target /tmp/site .whl/*.whl \
      || echo "wheel install: FAILED" | tee -a "$SUMMARY"
    export PYTHONPATH=/tmp/site
  else
    echo "no .whl/ (run bench/gpu_wheels.sh here and carry .whl): deepspeed/datasets missing" \
      | tee -a "$SUMMARY"
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

# run NAME LIMIT_S CMD...: CMD's output to $OUT/NAME.log (and here), its rc and time to the
# summary; never stops the script
run_part() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  # the full log in the file; here without NCCL's and torch's per-call chatter
  timeout -k 20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" \
    | grep -vE "NCCL INFO|FutureWarning: .torch.distributed|^  return func\("
  rc=${PIPESTATUS[0]}
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT" || { ((rc)) && verdict=FAILED; }
  echo "$name: $verdict (rc $rc, $((SECONDS - start)) s)" | tee -a "$SUMMARY"
  return "$rc"
}

# (a) the GPU
if wants gpu; then
  if ((DRY)); then
    echo "gpu: none (dry run on CPU)" | tee -a "$SUMMARY"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
      --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
  fi
  "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$SUMMARY"
  "$PY" -c "import deepspeed, datasets; print('deepspeed', deepspeed.__version__, 'datasets', \
datasets.__version__)" 2>&1 | tail -1 | tee -a "$SUMMARY"
fi

# (b) MFU of the 1B -> 400M pair (bench/mfu.py's docstring), more steps and a larger batch than
# on CPU; the dry run: a tiny pair
if wants mfu; then
  trl=()
  "$PY" -c "import trl" 2>/dev/null || trl=(--skip-trl)
  if ((DRY)); then
    mfu=(--pair random --hidden 128 --layers 2 --student-hidden 64 --student-layers 2
         --vocab 1024 --seq-len 64 --batch-size 2 --text-chars 100000 --data-chars 20000
         --steps 3 --warmup-steps 1 --repeats 1 --precision bf16 --threads 1)
    limit=400
  else
    mfu=(--pair random --hidden 2048 --layers 20 --student-hidden 1536 --student-layers 14
         --seq-len 1024 --batch-size 8 --text-chars 1500000 --data-chars 200000
         --steps 12 --warmup-steps 4 --repeats 2 --precision bf16)
    limit=300
  fi
  run_part mfu "$limit" "$PY" bench/mfu.py "${mfu[@]}" --device "$DEVICE" "${trl[@]}"
fi

# (c) the tiny world, its pruned student, distill under ZeRO-2 and ZeRO-3 (one process)
if wants zero; then
  work=$(mktemp -d /tmp/gpu-checks-zero.XXXXXX)
  if run_part tiny 60 "$PY" -m minima_cli.cli run recipes/tiny.yaml --workdir "$work" \
      --until prune --set tiny.documents=400 --set tiny.steps=30 --set score.batches=2 -q; then
    for zero in zero2 zero3; do
      port=$("$PY" -c "from minima_cli.training.loop import free_port; print(free_port())")
      run_part "$zero" 90 env NCCL_DEBUG=INFO "$PY" -m torch.distributed.run --nproc_per_node 1 \
        --master_port "$port" -m minima_cli.cli distill -t "$work/tiny/teacher" \
        -s "$work/prune" -d "$work/tiny/data/train.txt" -o "$work/$zero" --loss fkl \
        --alpha 0.5 --seq-len 64 --batch-size 8 --max-steps 40 --lr 3e-3 --warmup-ratio 0.05 \
        --eval-every 20 --save-every 20 --no-tensorboard --precision bf16 \
        --deepspeed "recipes/deepspeed/$zero.json" -q
      "$PY" - "$work/$zero" "$OUT/$zero.log" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, math, re, sys
from pathlib import Path
out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text(errors="replace")
nccl = re.search(r"NCCL version [^\s]+", log)
backend = nccl.group(0) if nccl else ("gloo/other (no NCCL lines)" if log else "no log")
try:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "minima.json").read_text())["metrics"]
except (OSError, ValueError, KeyError) as error:
    sys.exit(f"  {out.name}: no result ({error}); backend {backend}")
losses = [r["loss"] for r in records]
valid = [r["valid_loss"] for r in records if "valid_loss" in r]
finite = all(math.isfinite(x) for x in losses + valid)
print(f"  {out.name}: {len(records)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, valid "
      + " -> ".join(f"{v:.4f}" for v in valid) + f"; world {metrics.get('world_size')}, "
      f"{'finite' if finite else 'NON-FINITE'}; {backend}; model.safetensors "
      f"{'written' if (out / 'model.safetensors').is_file() else 'MISSING'}")
# learning: the mean of the last 5 steps' losses below the first 5's
sys.exit(0 if finite and sum(losses[-5:]) < sum(losses[:5]) else 1)
EOF
    done
  fi
  rm -rf "$work"
fi

# (d)
echo "compile: skipped (tests/integration/test_compile.py pins LocalSession(\"cpu\"): no CUDA" \
  "path to test)" | tee -a "$SUMMARY"

echo "== summary"
cat "$SUMMARY"
! grep -qE "FAILED|TIMED OUT|NON-FINITE|no result" "$SUMMARY"
