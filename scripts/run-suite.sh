#!/usr/bin/env bash
# Runs on the lent GPU machine, from the bundle scripts/gpu-bundle made (see there).
#   bash .gpu-bundle/run-suite.sh [--no-tests] [--no-sanitizer] [--bench] [--criterion FILTER]
# --bench runs the examples (the main job and the benchmark report, whose JSON lands in $OUT);
# --criterion runs the criterion layer bench restricted to FILTER (e.g. layer/A).
# Full logs go to $OUT (the device tool's output folder) when it is set.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
sanitize=1
bench=0
tests=1
criterion=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-sanitizer) sanitize=0 ;;
    --no-tests) tests=0; sanitize=0 ;;
    --bench) bench=1 ;;
    --criterion) criterion="$2"; shift ;;
  esac
  shift
done
# The cuBLAS baselines load libcublas at run time: put the toolkit's (or a wheel's) on the path.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export REMOE_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
echo "commit: $(cat "$here/COMMIT" | tr '\n' ' ')" | tee -a "$out/device.txt"

summary=()
total_pass=0
total_fail=0
for bin in "$here"/tests/*; do
  [[ $tests -eq 1 ]] || break
  name="$(basename "$bin")"
  log="$out/tmp-test.log"
  "$bin" --test-threads=1 >"$log" 2>&1
  rc=$?
  { echo "=== $name (rc=$rc)"; cat "$log"; } >>"$out/tests.log"
  p=$(grep -oE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
  f=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
  total_pass=$((total_pass + p))
  total_fail=$((total_fail + f))
  [[ $rc -ne 0 && $f -eq 0 ]] && total_fail=$((total_fail + 1))
  summary+=("$(printf '%-28s rc=%-3s %4s passed %4s failed' "$name" "$rc" "$p" "$f")")
  if [[ $rc -ne 0 ]]; then grep -E "panicked|FAILED|error" "$log" | head -20; fi
done
rm -f "$out/tmp-test.log"

san_summary=()
if [[ $sanitize -eq 1 ]] && command -v compute-sanitizer >/dev/null; then
  for bin in "$here"/tests/gpu_*; do
    [[ -e "$bin" ]] || continue
    name="$(basename "$bin")"
    for tool in memcheck; do
      log="$out/tmp-sanitizer.log"
      compute-sanitizer --tool "$tool" --error-exitcode 86 "$bin" --test-threads=1 >"$log" 2>&1
      rc=$?
      { echo "=== $tool $name (rc=$rc)"; cat "$log"; } >>"$out/sanitizer.log"
      san_summary+=("$(printf '%-10s %-28s rc=%-3s %s' "$tool" "$name" "$rc" "$(grep -E 'ERROR SUMMARY' "$log" | tail -1)")")
    done
  done
fi

if [[ $bench -eq 1 ]]; then
  { echo "=== remoe_layer"; "$here/examples/remoe_layer" 2>&1; } | tee -a "$out/examples.log" | tail -5
  { echo "=== bench_report"; "$here/examples/bench_report" --json "$out/bench-report.json" 2>&1; } |
    tee -a "$out/examples.log" | tail -45
fi
if [[ -n "$criterion" ]]; then
  "$here/benches/layer" --bench "$criterion" 2>&1 | grep -vE '^(Benchmarking|Warning)' | tee "$out/criterion.log" | tail -40
fi

echo
echo "=== GPU suite on $(head -1 "$out/device.txt") ==="
printf '%s\n' "${summary[@]}"
echo "TOTAL: $total_pass passed, $total_fail failed"
[[ ${#san_summary[@]} -gt 0 ]] && printf '%s\n' "${san_summary[@]}"
[[ $total_fail -eq 0 ]]
