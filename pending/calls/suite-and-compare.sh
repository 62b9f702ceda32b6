#!/usr/bin/env bash
# Device calls for a bundle of pending patches. Whatever of these folders the call carried runs:
# - the bundle (B, default target/xb/pending): the whole suite on both GEMM paths with
#   bench_report's short pass over every named configuration (run-suite.sh's default) and
#   memcheck, initcheck and synccheck, then racecheck of RACE_BINS until about 570 s;
# - the comparison folder (C, default target/xb/cmp2: head-bench_report.gz, main's, and
#   new-bench_report.gz, the bundle's): the bundle's latency.gz at LAT_TOKENS (default 1,8,64),
#   then the two bench_reports alternated, new, head, new, head, at CFGS, so that clocks and heat
#   fall on both alike.
# The whole bundle and the tracked files pass the carry limit (64 MiB) since gpu_decode joined
# the suite, so carry it in two parts:
#   run(command="RACE_BINS=gpu_forward,gpu_graph bash pending/calls/suite-and-compare.sh",
#       carry=["target/xb/pending/tests", "target/xb/pending/examples",
#              "target/xb/pending/benches", "target/xb/pending/run-suite.sh",
#              "target/xb/pending/COMMIT"])
#   run(command="SUITE_ARGS='--no-quick --bins gpu_candle' \
#                bash pending/calls/suite-and-compare.sh",
#       carry=["target/xb/cmp2", "target/xb/pending/candle", "target/xb/pending/run-suite.sh",
#              "target/xb/pending/COMMIT"])
# DEADLINE (default 560 s) is when the last bench_report round may start at the latest less 60 s;
# a call that ran something before this script passes what is left of its 600 s.
# The logs come back as one archive (the device tool returns at most 8 files).
# On 2026-12-07 (router-bwd-mma + no-dy, with --no-quick): suite 235 s; four bench_report runs of
# six configurations 180 s. The short pass adds about 90 s.
set -u
S=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
b=${B:-target/xb/pending}
c=${C:-target/xb/cmp2}
cfgs=${CFGS:-SM1 SM7 SM30 Q3 A C}
race_bins=${RACE_BINS:-gpu_backward,gpu_gemm_paths}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
if [[ -f $b/run-suite.sh ]]; then
  cat $b/COMMIT > $OUT/commit.txt
  # SUITE_ARGS: e.g. "--no-quick --bins gpu_candle" for a call that carried the candle tests only.
  timeout 420 bash $b/run-suite.sh ${SUITE_ARGS:-} --sanitizers memcheck,initcheck,synccheck \
    --sanitizer-jobs 14 > $OUT/suite.log 2>&1
  echo "suite rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
fi
cublas_on_path
if [[ -f $c/head-bench_report.gz ]]; then
  cat $c/COMMIT >> $OUT/commit.txt
  for v in head new; do gunzip -c $c/$v-bench_report.gz > /tmp/$v-br; chmod +x /tmp/$v-br; done
  # The bundle's latency (decode-auto's `auto` column beside graph and graph-small) first: it
  # is the only decode figure of the call, and the rounds below stop at the deadline anyway.
  if [[ -f $c/latency.gz ]]; then
    gunzip -c $c/latency.gz > /tmp/latency && chmod +x /tmp/latency
    timeout 150 /tmp/latency --tokens ${LAT_TOKENS:-1,8,64} --json $OUT/latency.json \
      > $OUT/latency.log 2>&1
    echo "latency rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
  fi
  bench_rounds "$cfgs"
fi
left=$((${DEADLINE:-560} + 10 - (SECONDS - S)))
if [[ -f $b/run-suite.sh && $left -gt 30 ]]; then
  timeout $left bash $b/run-suite.sh --sanitizers-only --bins $race_bins --sanitizers racecheck \
    --sanitizer-jobs 14 --racecheck-jobs 8 --sanitizer-deadline $((left - 8)) > $OUT/race.log 2>&1
  echo "race rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
fi
cat $OUT/commit.txt $OUT/gpu.txt $OUT/rc.txt
grep -E "TOTAL|FAILED|panicked" $OUT/suite.log 2>/dev/null | tail -8
grep -hE "^\s*(memcheck|initcheck|synccheck|racecheck) " $OUT/suite.log $OUT/race.log 2>/dev/null | grep -v " 0 errors$" | tail -8
[[ -f $OUT/latency.log ]] && tail -32 $OUT/latency.log | cut -c1-150
for f in $OUT/*-?.log; do
  echo "== $(basename $f)"; grep -E "^[A-Z0-9]+ +uniform +ReMoE +hopper +0|FAILED" $f | cut -c1-110
done
cd $OUT && tar czf all.tgz --remove-files *
