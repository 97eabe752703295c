#!/usr/bin/env bash
# GPU check of the whole path on one GPU, for a CUDA machine. Finishes inside 8 minutes.
#
#   bench/gpu_check.sh [--wheels DIR] [--python PY] [--dry-run] [--out FILE]
#
# 1. installs the wheels in DIR (and nothing else: --no-index), when given;
# 2. runs the tests marked `gpu`;
# 3. builds a Llama-2-7B-shaped model (random float16 weights created on the GPU, saved as
#    safetensors in a temp folder, /dev/shm when it has room; no download);
# 4. starts a local coordinator on loopback and the daemon serving that model
#    (decode = "eager"), and at 1, 8, 32 and 64 jobs in flight measures tokens/s per job and
#    in all, time to first token p50/p95, the same for raw generate alternating with it, and
#    batch-1 tokens/s as a fraction of the HBM ceiling (weight bytes read per token against
#    the measured device copy bandwidth);
# 5. the same daemon figures with decode = "static" and decode = "continuous", each against
#    eager (a mode that fails has its error recorded, and the check goes on);
# 6. writes bench/gpu_results.json (or --out FILE) and prints it as a table
#    (bench/gpu_check.py report).
#
# Each step runs under `timeout`, capped by what is left of the 8 minutes; a step that
# would start with too little left is skipped and says so in the JSON.
# --dry-run runs the same path on the CPU with the tiny shape, 16 new tokens and 1 and 4
# jobs in flight (no GPU needed), to check the script itself; it writes
# bench/gpu_results.dry-run.json (or --out FILE), never the GPU figures.
# Exit status: non-zero when the tests, the build or the eager path fail.
set -euo pipefail

CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."
PY=".venv/bin/python"
[ -x "$PY" ] || PY="python3"
WHEELS=""
DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --out) case "$2" in /*) OUT="$2" ;; *) OUT="$CALLER_DIR/$2" ;; esac; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$DRY_RUN" = 1 ]; then
  SHAPE=tiny DEVICE=cpu IN_FLIGHT=1,4 NEW_TOKENS=16 REPEATS=1 TOTAL_S=600
  TESTS=(tests/transformers) REPORT_FLAGS=(--dry-run)
  OUT="${OUT:-bench/gpu_results.dry-run.json}"
else
  SHAPE=llama2-7b DEVICE=cuda:0 IN_FLIGHT=1,8,32,64 NEW_TOKENS=64 REPEATS=2 TOTAL_S=460
  TESTS=(tests) REPORT_FLAGS=()
  OUT="${OUT:-bench/gpu_results.json}"
fi

started=$(date +%s)
deadline=$(( started + TOTAL_S ))
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }
# limit SECONDS: the step's own cap, or what is left before the deadline less a reserve for
# the report, whichever is less; prints 0 when too little is left to start the step.
limit() {
  local left=$(( deadline - $(date +%s) - 20 ))
  local cap=$(( $1 < left ? $1 : left ))
  [ "$cap" -ge 15 ] && echo "$cap" || echo 0
}
STATUS=""
FAILED=0
LAST_RC=0
# timed NAME CAP CMD...: run CMD under timeout, note NAME=rc:seconds for the report and the
# exit status in LAST_RC; returns non-zero when CMD failed or was skipped.
timed() {
  local name="$1" cap t0
  cap=$(limit "$2"); shift 2
  if [ "$cap" = 0 ]; then
    echo "skipped: the ${TOTAL_S} s budget is spent"
    STATUS="${STATUS}${name}=skipped:0,"
    LAST_RC=skipped
    return 1
  fi
  t0=$(date +%s)
  LAST_RC=0
  timeout -k 10 "$cap" "$@" || LAST_RC=$?
  STATUS="${STATUS}${name}=${LAST_RC}:$(( $(date +%s) - t0 )),"
  [ "$LAST_RC" = 0 ]
}

if [ -n "$WHEELS" ]; then
  step "installing the wheels in $WHEELS (no index)"
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  [ ${#wheels[@]} -gt 0 ] || { echo "no .whl files in $WHEELS" >&2; exit 2; }
  "$PY" -m pip install --no-index --find-links "$WHEELS" "${wheels[@]}"
  started=$(date +%s) deadline=$(( $(date +%s) + TOTAL_S ))
fi

step "environment"
timeout 60 "$PY" - <<'EOF'
import torch, transformers
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
for i in range(torch.cuda.device_count() if cuda else 0):
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
if not cuda:
    print("no CUDA device visible")
EOF

PARTS=$(mktemp -d -t aitbc-gpu-parts-XXXXXX)
WORK=$("$PY" bench/gpu_check.py workdir --shape "$SHAPE")
trap 'rm -rf "$WORK" "$PARTS"' EXIT
trap 'exit 143' INT TERM  # so that the model folder (13.5 GB, maybe in /dev/shm) goes too
MODEL="$WORK/$SHAPE"
COMMON=(--shape "$SHAPE" --device "$DEVICE" --folder "$MODEL")

if [ "$DRY_RUN" = 1 ]; then
  step "gpu-marked tests (dry run: collected, skipped without CUDA)"
else
  step "gpu-marked tests"
fi
timed tests 100 "$PY" -m pytest -q -m gpu "${TESTS[@]}" -p no:cacheprovider || true
# pytest exit 5: no test was selected to run (none marked gpu here)
[ "$LAST_RC" = 0 ] || [ "$LAST_RC" = 5 ] || FAILED=1

step "model: $SHAPE, random weights, built on $DEVICE"
if timed build 90 "$PY" bench/gpu_check.py build "${COMMON[@]}" --part "$PARTS/build.json"; then
  path() {  # path MODE CAP [--raw]
    local mode="$1" cap="$2"; shift 2
    local budget=$(( $(limit "$cap") - 15 ))
    timed "$mode" "$cap" "$PY" bench/gpu_check.py path "${COMMON[@]}" --decode "$mode" --in-flight "$IN_FLIGHT" \
      --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --budget-s "$(( budget > 0 ? budget : 1 ))" \
      --part "$PARTS/$mode.json" "$@"
  }
  step "whole path, decode = eager, against raw generate (in flight: $IN_FLIGHT)"
  path eager 150 --raw || FAILED=1
  step "whole path, decode = static"
  path static 90 || echo "decode = static failed; recorded in the results"
  step "whole path, decode = continuous"
  path continuous 70 || echo "decode = continuous failed; recorded in the results"
else
  FAILED=1
fi

step "results"
timeout 30 "$PY" bench/gpu_check.py report --parts "$PARTS" --status "${STATUS%,}" --json "$OUT" \
  "${REPORT_FLAGS[@]}" || FAILED=1
step "done"
exit "$FAILED"
