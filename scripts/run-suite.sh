#!/usr/bin/env bash
# Runs on the lent GPU machine, from the bundle scripts/gpu-bundle made (see there).
#   bash .gpu-bundle/run-suite.sh [--no-tests | --sanitizers-only] [--no-sanitizer] [--sanitizers LIST]
#                                 [--sanitizer-timeout SECONDS] [--sanitizer-jobs N] [--filter TEST]
#                                 [--bins NAME,NAME] [--sanitizer-deadline SECONDS] [--racecheck-jobs N]
#                                 [--bench] [--criterion FILTER] [--no-quick]
# Every test binary runs with REMOE_REQUIRE_GPU=1. Then every GPU test binary (tests/gpu_*, and
# the lib's unit tests) runs again under each compute-sanitizer tool: memcheck, racecheck (hazard
# reports only), initcheck and synccheck; each run's summary line goes into the final table and
# its log into $OUT/sanitizer-<tool>.log. A sanitizer run that reports errors, fails or runs
# past --sanitizer-timeout (default 600 s per tool and test; each test runs in a process of
# its own) fails the suite.
# --no-sanitizer skips the sanitizers; --sanitizers memcheck,synccheck picks some of them;
# --sanitizers-only skips the plain test runs; --no-tests skips tests and sanitizers (--bench).
# --filter passes a test-name filter to every test binary (e.g. --filter router).
# On a compute capability 9.0 GPU every GPU test binary runs a second time with
# REMOE_GEMM_PATH=mma-sync: both expert-GEMM paths pass the whole suite.
# After the plain test runs (not with --sanitizers-only or --no-tests), the benchmark report's
# short pass runs once: `examples/bench_report --quick` (3 warm-up and 5 timed runs per figure,
# every named configuration of docs/SPEC.md, both loads, each GEMM path, the expert GEMMs against
# cuBLAS; about a minute or two on an H100), logged to $OUT/bench-quick.log with its JSON in
# $OUT/bench-quick.json. It fails the suite when it exits non-zero: a configuration part that
# failed (an error such as CapacityExceeded, or a panic) is a FAILED row there. --no-quick skips
# it; --bench replaces it with the full report.
# --bench runs the kernel-level check of the GEMM paths (tools/gemm-paths) and the examples (one
# layer at config A, the full benchmark report, whose JSON lands in $OUT and whose failure fails
# the suite): a bundle made by `scripts/gpu-bundle --bench`. The main job has its own bundle and
# runner (scripts/run-train.sh);
# --criterion runs the criterion layer bench restricted to FILTER (e.g. layer/A). Its shapes
# come from REMOE_BENCH_SHAPES (benches/layer.rs); unset, and FILTER naming one shape as its
# second part (layer/A, gemm/SM7b/dx), only that shape is set up.
# Full logs go to $OUT (the device tool's output folder) when it is set.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
sanitize=1
sanitizers="memcheck,initcheck,synccheck,racecheck"
sanitizer_timeout=600
san_jobs=8
san_deadline=0
race_jobs=3
only_bins=""
filter=()
bench=0
tests=1
criterion=""
quick=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-sanitizer) sanitize=0 ;;
    --sanitizers) sanitizers="$2"; shift ;;
    --sanitizer-timeout) sanitizer_timeout="$2"; shift ;;
    --sanitizer-jobs) san_jobs="$2"; shift ;;
    --sanitizer-deadline) san_deadline="$2"; shift ;;
    --racecheck-jobs) race_jobs="$2"; shift ;;
    --bins) only_bins="$2"; shift ;;
    --filter) filter=("$2"); shift ;;
    --no-tests) tests=0; sanitize=0 ;;
    --sanitizers-only) tests=0 ;;
    --bench) bench=1 ;;
    --criterion) criterion="$2"; shift ;;
    --no-quick) quick=0 ;;
    *) echo "run-suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
# scripts/gpu-bundle gzips the binaries; unpack them once.
for packed in "$here"/tests/*.gz "$here"/benches/*.gz "$here"/examples/*.gz "$here"/candle/*.gz; do
  [[ -e "$packed" ]] || continue
  gunzip -f "$packed" && chmod +x "${packed%.gz}"
done
# The cuBLAS baselines load libcublas at run time: put the toolkit's (or a wheel's) on the path.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The candle tests (scripts/gpu-bundle --candle) link CUDA's libraries (libcublas.so.13, ...):
# the toolkit's folder goes on the loader path.
if [[ -e "$here/candle/gpu_candle" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
  lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# NCCL (the expert-parallel tests, built with the `ep` feature): cudarc opens `libnccl.so`, while
# the pip wheel and the runtime package ship only the soname libnccl.so.2, so a link in a folder
# of our own goes on the loader path. NVLink SHARP (multicast) stays off on the shared machines.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib"))' 2>/dev/null)
  [[ -z "$nccl" ]] && nccl=$(dirname "$(find /usr/lib /usr/local /opt -name 'libnccl.so.2' 2>/dev/null | head -1)" 2>/dev/null)
  if [[ -n "$nccl" && -e "$nccl/libnccl.so.2" ]]; then
    mkdir -p "$here/nccl-lib"
    ln -sf "$nccl/libnccl.so.2" "$here/nccl-lib/libnccl.so"
    export LD_LIBRARY_PATH="$here/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
export NCCL_NVLS_ENABLE=0
export REMOE_REQUIRE_GPU=1
# On a machine with several GPUs, the tests that need them must run rather than skip.
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
[[ "$gpus" -ge 2 ]] && export REMOE_REQUIRE_GPUS="$gpus"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
echo "commit: $(cat "$here/COMMIT" | tr '\n' ' ')" | tee -a "$out/device.txt"

summary=()
total_pass=0
total_fail=0
# On a Hopper GPU the GPU tests run twice: on the default (Hopper) GEMM path, then with the
# portable mma.sync path forced (REMOE_GEMM_PATH, src/gemm.rs), so both paths pass every test.
runs=()
gpu_bins=("$here"/tests/gpu_*)
[[ -e "$here/candle/gpu_candle" ]] && gpu_bins+=("$here/candle/gpu_candle")
# The lib's unit tests hold GPU tests of their own (the expert-parallel dispatch kernels against
# their host forms): the sanitizers check them too.
san_bins=("${gpu_bins[@]}" "$here/tests/unit")
# --bins a,b: only those test binaries (by file name).
if [[ -n "$only_bins" ]]; then
  keep() { local b; for b in "$@"; do [[ ",$only_bins," == *",$(basename "$b"),"* ]] && echo "$b"; done; }
  mapfile -t gpu_bins < <(keep "${gpu_bins[@]}")
  mapfile -t san_bins < <(keep "${san_bins[@]}")
  mapfile -t all_bins < <(keep "$here"/tests/*)
else
  all_bins=("$here"/tests/*)
fi
for bin in "${all_bins[@]}"; do runs+=("$bin|"); done
[[ -e "$here/candle/gpu_candle" && ( -z "$only_bins" || ",$only_bins," == *",gpu_candle,"* ) ]] && runs+=("$here/candle/gpu_candle|")
if nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -q '^9\.0'; then
  for bin in "${gpu_bins[@]}"; do runs+=("$bin|mma-sync"); done
fi
for run in "${runs[@]}"; do
  [[ $tests -eq 1 ]] || break
  bin="${run%|*}"
  path="${run#*|}"
  name="$(basename "$bin")${path:+ ($path)}"
  log="$out/tmp-test.log"
  if [[ -n "$path" ]]; then
    REMOE_GEMM_PATH="$path" "$bin" --test-threads=1 "${filter[@]}" >"$log" 2>&1
  else
    "$bin" --test-threads=1 "${filter[@]}" >"$log" 2>&1
  fi
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

# The benchmark report's short pass, once, after the tests (the full report with --bench).
quick_summary=""
quick_fail=0
if [[ $tests -eq 1 && $quick -eq 1 && $bench -eq 0 ]]; then
  echo "=== bench_report --quick (log: $out/bench-quick.log)"
  start=$SECONDS
  "$here/examples/bench_report" --quick --json "$out/bench-quick.json" >"$out/bench-quick.log" 2>&1
  rc=$?
  failed_rows="$(sed -nE 's/^== FAILED: ([0-9]+) part.*/\1/p' "$out/bench-quick.log")"
  if grep -q '^== Against the targets' "$out/bench-quick.log"; then
    sed -n '/^== Against the targets/,$p' "$out/bench-quick.log" | cut -c1-200
  else
    tail -20 "$out/bench-quick.log"
  fi
  [[ $rc -ne 0 ]] && quick_fail=1
  quick_summary="$(printf '%-28s rc=%-3s %5ss  %s FAILED rows' "bench_report --quick" "$rc" \
    "$((SECONDS - start))" "${failed_rows:-0}")"
fi

san_summary=()
san_fail=0
# One process per (tool, binary, test): the sanitizers' host memory grows with the work a
# process has launched (racecheck reached 128 GB on gpu_backward as one process), so each test
# gets a fresh one and --sanitizer-timeout applies per test. --sanitizer-jobs of them run at once
# (the GPU has room for several tests' buffers, and each sanitizer keeps one CPU core busy); a
# test that fails while others ran beside it (out of memory, a timeout) runs once more alone,
# and the summary says so: that result is the one counted.
run_san_job() {
  local tool="$1" bin="$2" test="$3" log="$4" opts=(--print-limit 50)
  # Hazards only (each with its source line, from -lineinfo), not the race analysis reports.
  [[ "$tool" == racecheck ]] && opts=(--racecheck-report hazard --print-limit 50)
  # initcheck reports reads of other libraries' buffers that it cannot see written (README):
  # every report is printed, without host backtraces, so that the summary can name the kernel
  # of each one rather than the first 50.
  [[ "$tool" == initcheck ]] && opts=(--show-backtrace device --print-limit 1000000)
  local t0=$SECONDS limit="$sanitizer_timeout"
  # Under --sanitizer-deadline no run outlives the deadline: one that would start after it does
  # not start, and one running at it is stopped; both count as not run (no .rc file). (The pass
  # once killed xargs at the deadline instead, which left the runs it had started going on
  # behind the suite's back, beside whatever the call ran next.)
  if [[ "${san_deadline_at:-0}" -gt 0 ]]; then
    local left=$((san_deadline_at - $(date +%s)))
    [[ $left -le 0 ]] && return 0
    [[ $left -lt $limit ]] && limit=$left
  fi
  # The tests read the tool's name (tests/common's sanitizer_tool) where a tool needs a
  # smaller case than the others.
  REMOE_SANITIZER_TOOL="$tool" timeout "$limit" compute-sanitizer --tool "$tool" "${opts[@]}" \
    --error-exitcode 86 "$bin" --test-threads=1 --exact "$test" >"$log.out" 2>&1
  local rc=$?
  if [[ $rc -eq 124 && "${san_deadline_at:-0}" -gt 0 && $(date +%s) -ge $san_deadline_at ]]; then
    rm -f "$log.out"
    return 0
  fi
  { echo "=== $tool $(basename "$bin") $test (rc=$rc, $((SECONDS - t0))s)"; cat "$log.out"; } >"$log"
  rm -f "$log.out"
  echo "$rc" >"$log.rc"
}
export -f run_san_job
export sanitizer_timeout
san_deadline_at=0
export san_deadline_at
if [[ $sanitize -eq 1 ]]; then
  if ! command -v compute-sanitizer >/dev/null; then
    san_summary+=("compute-sanitizer not found: sanitizers not run")
    san_fail=1
  else
    IFS=',' read -r -a tools <<<"$sanitizers"
    for tool in "${tools[@]}"; do
      case "$tool" in
        memcheck | racecheck | initcheck | synccheck) ;;
        *) echo "run-suite.sh: unknown sanitizer $tool" >&2; exit 2 ;;
      esac
    done
    jobdir="$out/san-jobs"
    rm -rf "$jobdir"; mkdir -p "$jobdir"
    jobs_file="$jobdir/list"
    : >"$jobs_file"
    n=0
    for tool in "${tools[@]}"; do
      for bin in "${san_bins[@]}"; do
        [[ -e "$bin" ]] || continue
        while read -r test; do
          [[ -n "$test" ]] || continue
          n=$((n + 1))
          printf '%s\t%s\t%s\t%s\n' "$tool" "$bin" "$test" "$jobdir/$n" >>"$jobs_file"
        done < <("$bin" --list --format terse "${filter[@]}" 2>/dev/null | sed -n 's/: test$//p')
      done
    done
    echo "=== sanitizers: $n runs, $san_jobs at a time ($race_jobs for racecheck) (logs: $out/sanitizer-<tool>.log)"
    san_start=$SECONDS
    # --sanitizer-deadline S: no run goes on past S seconds (those not started, or stopped at S,
    # are "not run" in the summary, which then fails), so that a time-limited machine still
    # reports what finished and the call's next step has the machine to itself.
    # Racecheck holds far more host memory per process than the other tools (tens of GB on the
    # larger tests): 14 of them at once on a 128 GB machine were killed by the kernel (rc 9).
    # So racecheck runs get their own pass, --racecheck-jobs at a time.
    # The slowest runs start first, so that the pass does not end waiting on one long test that
    # started last: the tests that took a minute or more under racecheck at a038e5a (H100, 4 jobs;
    # seconds), in that order. Any other test keeps the list's order after them.
    slow_first=(
      gpu_config_a_from_a_dense_start_is_dropless           # 377
      ep_backward_is_bitwise_the_one_gpu_layer              # 278
      both_gemm_paths_agree_at_a_real_layer_size            # 136
      a_small_candle_model_trains                           # 111
      both_gemm_paths_agree_at_decode                       # 97
      the_layer_from_a_config_matches_the_reference_on_cuda # 78
      ep_forward_is_bitwise_the_one_gpu_layer_on_each_ranks_tokens # 65
    )
    by_slowness() {
      awk -F'\t' -v slow="${slow_first[*]}" '
        BEGIN { n = split(slow, s, " "); for (i = 1; i <= n; i++) rank[s[i]] = i }
        { r = ($3 in rank) ? rank[$3] : n + 1; printf "%06d\t%06d\t%s\n", r, NR, $0 }' |
        sort -t$'\t' -k1,1n -k2,2n | cut -f3-
    }
    # Each run stops at the deadline itself (run_san_job), so xargs ends soon after it.
    [[ "$san_deadline" -gt 0 ]] && san_deadline_at=$(($(date +%s) + san_deadline))
    run_pass() { # <jobs> <tool filter: racecheck | others>
      if [[ "$2" == racecheck ]]; then grep -P '^racecheck\t' "$jobs_file"; else grep -vP '^racecheck\t' "$jobs_file"; fi |
        by_slowness | tr '\n' '\0' |
        xargs -0 -r -P "$1" -I{} bash -c 'IFS=$'"'"'\t'"'"' read -r t b x l <<<"$1"; run_san_job "$t" "$b" "$x" "$l"' _ {}
    }
    run_pass "$san_jobs" others
    run_pass "$race_jobs" racecheck
    # Failures (or runs with no summary) once more, alone.
    declare -A rerun=()
    while IFS=$'\t' read -r tool bin test log; do
      [[ -e "$log.rc" ]] || continue # not run (the deadline)
      [[ "$san_deadline" -gt 0 && $((SECONDS - san_start)) -ge "$san_deadline" ]] && break
      rc="$(cat "$log.rc")"
      if [[ "$rc" -ne 0 ]] || ! grep -qE '(ERROR|RACECHECK) SUMMARY|terminated before first instrumented' "$log"; then
        if ! grep -q 'terminated before first instrumented API call' "$log" || [[ "$rc" -ne 0 ]]; then
          mv "$log" "$log.first"
          run_san_job "$tool" "$bin" "$test" "$log"
          rerun["$log"]=1
        fi
      fi
    done <"$jobs_file"
    # initcheck does not see the writes of candle's bf16/f16 matmuls (cuBLAS) on the H100, so
    # candle's elementwise kernels reading their output are reported (README). A test's reports
    # count as that known case only when the test passed and every one of its $2 reports is an
    # uninitialised read in a kernel named as candle's unary and binary kernels are
    # (u<op>_<dtype>, b<op>_<dtype>); none of this crate's kernels is named so (they end in
    # _kernel), so a report in one of them still fails the run.
    candle_only_initcheck() {
      grep -qE 'test result: ok\. 1 passed' "$1" || return 1
      local at ours reads
      at="$(grep -cE '^=========     at ' "$1")"
      ours="$(grep -E '^=========     at ' "$1" | sed -E 's/^=========     at (void )?([^ +(<]+).*/\2/' |
        grep -cvE '^[ub][a-z0-9]+_(bf16|f16|f32|f64|u8|u32|i64)$')"
      reads="$(grep -cE '========= Uninitialized __global__ memory read of size' "$1")"
      [[ $at -eq $2 && $reads -eq $2 && $ours -eq 0 ]]
    }
    for tool in "${tools[@]}"; do
      tool_log="$out/sanitizer-$tool.log"
      : >"$tool_log"
      for bin in "${san_bins[@]}"; do
        [[ -e "$bin" ]] || continue
        name="$(basename "$bin")"
        bin_rc=0 errors=0 known=0 checked=0 bad=() reruns=0 not_run=0 tb_logs=()
        while IFS=$'\t' read -r t b test log; do
          [[ "$t" == "$tool" && "$b" == "$bin" ]] || continue
          if [[ ! -e "$log.rc" || ! -e "$log" ]]; then
            not_run=$((not_run + 1))
            continue
          fi
          cat "$log" >>"$tool_log"
          tb_logs+=("$log")
          [[ -e "$log.first" ]] && { echo "(an earlier run beside others:)"; cat "$log.first"; } >>"$tool_log"
          rc="$(cat "$log.rc")"
          [[ -n "${rerun[$log]:-}" ]] && reruns=$((reruns + 1))
          if grep -q 'terminated before first instrumented API call' "$log" &&
            grep -qE 'test result: ok\. 1 passed; 0 failed' "$log"; then
            continue # a CPU-only test, or one skipped under the sanitizer: no GPU work to check
          fi
          checked=$((checked + 1))
          line="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -1)"
          e="$(sed -nE 's/.*SUMMARY: ([0-9]+) (errors?|hazards?).*/\1/p' <<<"$line")"
          if [[ $tool == initcheck && ${e:-0} -gt 0 ]] && candle_only_initcheck "$log" "$e"; then
            known=$((known + e))
            continue
          fi
          errors=$((errors + ${e:-0}))
          if [[ $rc -ne 0 || -z "$e" ]]; then
            bin_rc=$rc
            [[ $rc -eq 124 ]] && bad+=("$test: timed out after ${sanitizer_timeout}s") ||
              bad+=("$test: rc=$rc${line:+, ${line##*SUMMARY: }}")
          fi
        done <"$jobs_file"
        what=$([[ $tool == racecheck ]] && echo hazards || echo errors)
        line="$checked tests with GPU work, $errors $what"
        # Which kernels the reports are in, most first (the reports printed: all of them for
        # initcheck, the first 50 per test for the other tools).
        [[ $known -gt 0 ]] && line+=" (and $known known reports, all in candle's elementwise kernels reading cuBLAS output: README)"
        if [[ $((errors + known)) -gt 0 ]]; then
          kernels="$(grep -hE '^=========     at ' "${tb_logs[@]}" 2>/dev/null |
            sed -E 's/^=========     at (void )?([^ +(<]+).*/\2/' | sort | uniq -c | sort -rn | head -8 | awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1 }')"
          [[ -n "$kernels" ]] && line+=" (in: $kernels)"
        fi
        [[ $reruns -gt 0 ]] && line+=" ($reruns rerun alone after failing beside others)"
        if [[ $not_run -gt 0 ]]; then
          line+="; $not_run tests NOT RUN (deadline)"
          bin_rc=1
        fi
        [[ ${#bad[@]} -gt 0 ]] && line+="; FAILED: ${bad[*]}"
        [[ $bin_rc -ne 0 || ${#bad[@]} -gt 0 ]] && san_fail=$((san_fail + 1))
        san_summary+=("$(printf '%-10s %-22s rc=%-3s %s' "$tool" "$name" "$bin_rc" "$line")")
      done
    done
    san_summary+=("sanitizers' wall time: $((SECONDS - san_start)) s")
    rm -rf "$jobdir"
  fi
fi

if [[ $bench -eq 1 ]]; then
  if [[ -x "$here/gemm-paths" ]]; then
    { echo "=== gemm-paths"; "$here/gemm-paths" 20 2>&1; } | tee -a "$out/gemm-paths.log" |
      grep -E "^(A|D) |router|PASSED|FAILED" | cut -c1-170
  fi
  { echo "=== remoe_layer"; "$here/examples/remoe_layer" 2>&1; } | tee -a "$out/examples.log" | tail -5
  start=$SECONDS
  { echo "=== bench_report"; "$here/examples/bench_report" --json "$out/bench-report.json" 2>&1; } |
    tee -a "$out/examples.log" | tail -45
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && quick_fail=1
  quick_summary="$(printf '%-28s rc=%-3s %5ss  (FAILED rows: see examples.log)' "bench_report" \
    "$rc" "$((SECONDS - start))")"
fi
if [[ -n "$criterion" ]]; then
  # Only the shape the filter names is set up, unless REMOE_BENCH_SHAPES says otherwise.
  if [[ -z "${REMOE_BENCH_SHAPES:-}" && "$criterion" =~ ^(layer|gemm)/([A-Za-z0-9_.-]+)(/|$) ]]; then
    export REMOE_BENCH_SHAPES="${BASH_REMATCH[2]}"
  fi
  "$here/benches/layer" --bench "$criterion" 2>&1 | grep -vE '^(Benchmarking|Warning)' | tee "$out/criterion.log" | tail -40
fi

echo
echo "=== GPU suite on $(head -1 "$out/device.txt") ==="
printf '%s\n' "${summary[@]}"
echo "TOTAL: $total_pass passed, $total_fail failed"
[[ -n "$quick_summary" ]] && echo "$quick_summary"
if [[ ${#san_summary[@]} -gt 0 ]]; then
  echo "--- compute-sanitizer ($san_fail failed)"
  printf '%s\n' "${san_summary[@]}"
fi
[[ $total_fail -eq 0 && $san_fail -eq 0 && $quick_fail -eq 0 ]]
