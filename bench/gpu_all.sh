#!/usr/bin/env bash
# One command for the whole GPU check of issue 13: the transformer (training MFU, the captured decode
# step at 16 / 128 / 512 rows and text -> image images/s at 8 / 64 / 256 prompts, beside the plain
# PyTorch reference), the Serve load bench and the ingest bench, then ONE table with the targets.
#
#   bash bench/gpu_all.sh                      # one H200 + 16 CPUs: <= 8 minutes
#   bash bench/gpu_all.sh --ref PATH           # the reference (default ../shared/bench/ref_gpt.py, if present)
#   bash bench/gpu_all.sh --dry-run            # the same code paths on CPU at tiny sizes, no GPU needed
#   bash bench/gpu_all.sh --only lm,ingest     # a subset of: lm, serve, ingest
#   bash bench/gpu_all.sh --legacy             # lm also times the decode loop from before the captured step
#
# Each step's output goes to $OUT (default /tmp/visgen-gpu-all): gpu_lm.jsonl + gpu_lm.log,
# serve_load.log, ingest.log, and table.txt, the table (bench/gpu_lm.py --report). A failing step is
# reported in the table and makes the exit status non-zero; the other steps still run.
# Extra flags for a step: GPU_LM_ARGS, SERVE_ARGS, INGEST_ARGS (appended to its command line).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
LEGACY=0
ONLY=lm,serve,ingest
REF=""
for candidate in ../shared/bench/ref_gpt.py shared/bench/ref_gpt.py; do
  [[ -z "$REF" && -f "$candidate" ]] && REF=$candidate
done
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --legacy) LEGACY=1 ;;
    --ref) REF=${2:?--ref needs a path}; shift ;;
    --only) ONLY=${2:?--only needs a list like lm,serve,ingest}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (allowed: --dry-run, --legacy, --ref PATH, --only lm,serve,ingest)" >&2; exit 2 ;;
  esac
  shift
done
for step in ${ONLY//,/ }; do
  [[ "$step" =~ ^(lm|serve|ingest)$ ]] || { echo "--only: unknown step '$step' (allowed: lm, serve, ingest)" >&2; exit 2; }
done

OUT=${OUT:-/tmp/visgen-gpu-all}
mkdir -p "$OUT"
rm -f "$OUT"/gpu_lm.jsonl "$OUT"/gpu_lm.log "$OUT"/serve_load.log "$OUT"/ingest.log "$OUT"/table.txt
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
CPUS=$(nproc)
(( CPUS > 16 )) && CPUS=16  # the issue's machine: 16 cores

LM=(bench/gpu_lm.py --jsonl "$OUT/gpu_lm.jsonl")
[[ -n "$REF" ]] && LM+=(--ref "$REF")
(( LEGACY )) && LM+=(--legacy)
if (( DRY )); then
  LM+=(--dry-run)
  SERVE=(bench/serve_load.py --duration 1 --concurrency 2 --batch-size 2 --cpus 2)
  INGEST=(bench/ingest.py --shards 2 --per-shard 8 --size 64 --resolution 32 --rounds 1 --cpus 2
          --data "$OUT/ingest-data")
else
  SERVE=(bench/serve_load.py --duration 10 --concurrency 16 64 --batch-size 64 --cpus "$CPUS")
  INGEST=(bench/ingest.py --cpus "$CPUS")  # the same shards and work as bench/ingest.py's defaults
fi
# shellcheck disable=SC2206 # word splitting of the extra flags is wanted
LM+=(${GPU_LM_ARGS:-}); SERVE+=(${SERVE_ARGS:-}); INGEST+=(${INGEST_ARGS:-})

FAILED=()
run_step() {  # name log command...
  local name=$1 log=$2 t0 rc
  shift 2
  echo "== $name: $*  (log: $log)"
  t0=$(date +%s)
  set +e
  "$PY" "$@" > "$log" 2>&1
  rc=$?
  set -e
  echo "   $name: exit $rc after $(( $(date +%s) - t0 )) s"
  if (( rc != 0 )); then
    FAILED+=("$name")
    tail -20 "$log" >&2
  fi
}

if command -v nvidia-smi >/dev/null 2>&1 && (( ! DRY )); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
fi
start=$(date +%s)
[[ ",$ONLY," == *",lm,"* ]] && run_step lm "$OUT/gpu_lm.log" "${LM[@]}"
[[ ",$ONLY," == *",serve,"* ]] && run_step serve "$OUT/serve_load.log" "${SERVE[@]}"
[[ ",$ONLY," == *",ingest,"* ]] && run_step ingest "$OUT/ingest.log" "${INGEST[@]}"
wall=$(( $(date +%s) - start ))

FAILED_CSV=$(IFS=,; echo "${FAILED[*]:-}")
"$PY" bench/gpu_lm.py --report "$OUT" --wall-s "$wall" --failed "$FAILED_CSV" | tee "$OUT/table.txt"
(( ${#FAILED[@]} == 0 ))
