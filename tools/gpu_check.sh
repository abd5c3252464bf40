#!/usr/bin/env bash
# One device call: install from source, GPU tests, compute-sanitizer on a small subset, benchmarks.
# Full logs go to $OUT (or ./gpu_out); a short summary is printed last.
#   tools/gpu_check.sh [tests|sanitize|bench|all] ...   (default: all)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-default}
steps=${*:-all}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
summary=()
has() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
if has tests; then
  timeout 420 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
  summary+=("tests: $(tail -1 "$OUT/tests.log")")
fi
if has sanitize; then
  for tool in memcheck racecheck synccheck; do
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 99 python3 tools/sanitize_kernels.py >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    summary+=("sanitizer $tool: exit $rc, $(grep -c 'ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards' "$OUT/sanitize_$tool.log") clean summaries; $(grep -m1 'SUMMARY' "$OUT/sanitize_$tool.log")")
  done
fi
if has bench; then
  timeout 400 python3 tools/bench_decode.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -25
  summary+=("bench: $(ls "$OUT"/bench_decode.md 2>/dev/null || echo missing)")
fi
echo "==== summary"; printf '%s\n' "${summary[@]}"
