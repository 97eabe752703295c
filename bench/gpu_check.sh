#!/usr/bin/env bash
# GPU check of the transformers runner, for a CUDA machine. Finishes well inside 5 minutes.
#
#   bench/gpu_check.sh [--wheels DIR] [--python PY] [--dry-run]
#
# 1. installs the wheels in DIR (and nothing else: --no-index), when given;
# 2. runs the tests marked `gpu`;
# 3. builds a Llama-2-7B-shaped model (random float16 weights, created on the GPU, no
#    download) and prints tokens/s at batch 1, 8 and 32 through the runner and through raw
#    generate, and batch-1 tokens/s as a fraction of the HBM ceiling (bench/gpu_check.py).
#
# --dry-run does steps 1-3 on the CPU with the tiny shape (no GPU needed), to check the
# script itself. Exit status: non-zero when a step fails.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=".venv/bin/python"
[ -x "$PY" ] || PY="python3"
WHEELS=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

if [ -n "$WHEELS" ]; then
  step "installing the wheels in $WHEELS (no index)"
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  [ ${#wheels[@]} -gt 0 ] || { echo "no .whl files in $WHEELS" >&2; exit 2; }
  "$PY" -m pip install --no-index --find-links "$WHEELS" "${wheels[@]}"
fi

step "environment"
"$PY" - <<'EOF'
import torch, transformers
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
for i in range(torch.cuda.device_count() if cuda else 0):
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
if not cuda:
    print("no CUDA device visible")
EOF

if [ "$DRY_RUN" = 1 ]; then
  step "gpu-marked tests (dry run: collected, skipped without CUDA)"
  timeout 300 "$PY" -m pytest -q -m gpu tests/transformers -p no:cacheprovider || [ $? -eq 5 ]
  step "throughput, tiny shape on the CPU (dry run)"
  timeout 300 "$PY" bench/gpu_check.py --shape tiny --device cpu --batches 1,8 --new-tokens 16 --repeats 1
else
  step "gpu-marked tests"
  timeout 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
  step "throughput, Llama-2-7B shape, float16, cuda:0"
  timeout 240 "$PY" bench/gpu_check.py --shape llama2-7b --device cuda:0 --batches 1,8,32 --new-tokens 64 \
    --json bench/gpu_results.json
fi
step "done"
