#!/usr/bin/env bash
# GPU check in as few device calls as possible: install from source, then the chosen steps.
# Full logs go to $OUT (or ./gpu_out); a short summary is printed last.
#   tools/gpu_check.sh [tests] [sanitize] [bench-decode] [bench-prefill] [soak] [serving] [mixed] [model] [all]  (default: all)
# A device call is limited to 10 minutes: "tests sanitize" fit in one, each benchmark in one.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
steps=${*:-all}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
summary=()
has() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
if has tests; then
  timeout 420 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
  summary+=("tests: $(tail -1 "$OUT/tests.log")")
fi
if has sanitize; then  # every kernel family: decode (attend, merge, append) and prefill (5 kernels)
  for tool in memcheck racecheck synccheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 python3 tools/sanitize_kernels.py >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    summary+=("sanitizer $tool: exit $rc; $(grep -m1 'SUMMARY' "$OUT/sanitize_$tool.log")")
  done
fi
if has bench-decode; then
  timeout 420 python3 tools/bench_decode.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_decode.log" | tail -25
  summary+=("bench decode: $(ls "$OUT"/bench_decode.md 2>/dev/null || echo missing)")
fi
if has bench-prefill; then
  timeout 540 python3 tools/bench_prefill.py --out "$OUT" --iters 5 ${PREFILL_ARGS:-} 2>&1 | tee "$OUT/bench_prefill.log" | tail -25
  summary+=("bench prefill: $(ls "$OUT"/bench_prefill.md 2>/dev/null || echo missing)")
fi
if has soak; then
  timeout 400 python3 tools/soak.py --backend cupy --ops ${SOAK_OPS:-10000} --out "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log" | tail -15
  summary+=("soak: $(tail -1 "$OUT/soak.log")")
fi
if has serving; then  # the serving example end to end: cpattn pipeline vs the same pipeline on torch SDPA
  timeout 400 python3 -m cpattn bench serving --out "$OUT" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/bench_serving.log" | tail -25
  rc=${PIPESTATUS[0]}
  summary+=("bench serving: exit $rc; $(ls "$OUT"/bench_serving.md 2>/dev/null || echo missing)")
fi
if has mixed; then  # the real model in mixed steps under Poisson arrivals vs transformers (needs the model file)
  if python3 -c 'import sys; from cpattn.serving.fetch import is_fetched; sys.exit(0 if is_fetched("smollm2") else 1)'; then
    timeout 400 python3 -m cpattn bench mixed --out "$OUT" ${MIXED_ARGS:-} 2>&1 | tee "$OUT/bench_mixed.log" | tail -25
    rc=${PIPESTATUS[0]}
    summary+=("bench mixed: exit $rc; $(ls "$OUT"/mixed_serving_*.md 2>/dev/null || echo missing)")
  else
    summary+=("bench mixed: skipped (no model file: cpattn models fetch smollm2, or CPATTN_MODELS=DIR holding it)")
  fi
fi
if has model; then  # the real model served in one batch vs transformers (needs the model file); MODEL_ARGS e.g. --requests 256 --new-tokens 64 --skip-hf
  if python3 -c 'import sys; from cpattn.serving.fetch import is_fetched; sys.exit(0 if is_fetched("smollm2") else 1)'; then
    timeout 500 python3 -m cpattn.bench.model_serving --out "$OUT" ${MODEL_ARGS:-} 2>&1 | tee "$OUT/bench_model.log" | tail -25
    rc=${PIPESTATUS[0]}
    summary+=("bench model: exit $rc; $(ls "$OUT"/model_serving_*.md 2>/dev/null || echo missing)")
  else
    summary+=("bench model: skipped (no model file: cpattn models fetch smollm2, or CPATTN_MODELS=DIR holding it)")
  fi
fi
echo "==== summary"; printf '%s\n' "${summary[@]}"
