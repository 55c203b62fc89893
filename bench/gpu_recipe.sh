#!/usr/bin/env bash
# One command for the one-GPU recipe check: run the whole pipeline on the recipe spec, sample the
# GPU every 5 s, then print the wall time, the per-stage times and the scores against the targets
# (bench/recipe_report.py).
#
#   bash bench/gpu_recipe.sh                       # pipelines/shapes-32-gpu.yaml on this machine's GPU
#   bash bench/gpu_recipe.sh --dry-run             # the same script on pipelines/shapes-tiny.yaml, CPU, ~2 min
#
# Logs and results go to $OUT (default: <workdir>/report): pipeline.log, dmon.txt, report.txt.
# WORKDIR (default /tmp/visgen-gpu-recipe/<spec name>) is wiped first, so the time is a fresh run's.
set -euo pipefail
cd "$(dirname "$0")/.."

SPEC=pipelines/shapes-32-gpu.yaml
if [[ "${1:-}" == "--dry-run" ]]; then
  SPEC=pipelines/shapes-tiny.yaml
  shift
fi
SPEC=${1:-$SPEC}
[[ -f "$SPEC" ]] || { echo "spec $SPEC does not exist" >&2; exit 2; }
NAME=$(basename "$SPEC" .yaml)
WORKDIR=${WORKDIR:-/tmp/visgen-gpu-recipe/$NAME}
OUT=${OUT:-$WORKDIR/report}
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python

rm -rf "$WORKDIR"
mkdir -p "$OUT"
DMON_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
  nvidia-smi dmon -s u -d 5 > "$OUT/dmon.txt" 2>&1 &
  DMON_PID=$!
fi
trap '[[ -n "$DMON_PID" ]] && kill "$DMON_PID" 2>/dev/null || true' EXIT

echo "recipe: $SPEC -> $WORKDIR (logs in $OUT)"
start=$(date +%s)
set +e
$PY jobs/pipeline.py --pipeline "$SPEC" --workdir "$WORKDIR" > "$OUT/pipeline.log" 2>&1
rc=$?
set -e
wall=$(( $(date +%s) - start ))
[[ -n "$DMON_PID" ]] && kill "$DMON_PID" 2>/dev/null || true
if [[ $rc -ne 0 ]]; then
  echo "the pipeline failed (exit $rc) after ${wall}s; last lines of $OUT/pipeline.log:" >&2
  tail -40 "$OUT/pipeline.log" >&2
  exit $rc
fi
DMON_ARGS=()
[[ -s "$OUT/dmon.txt" ]] && DMON_ARGS=(--dmon "$OUT/dmon.txt")
$PY bench/recipe_report.py --workdir "$WORKDIR" --wall-s "$wall" "${DMON_ARGS[@]}" | tee "$OUT/report.txt"
