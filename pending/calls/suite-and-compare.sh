#!/usr/bin/env bash
# One device call (600 s) for a bundle of pending patches: the whole suite on both GEMM paths
# with bench_report's short pass over every named configuration (run-suite.sh's default) and
# memcheck, initcheck and synccheck; the bundle's bench_report against main's, alternated
# (new, head, new, head) so that clocks and heat fall on both alike; racecheck of the binaries
# named in RACE_BINS until about 570 s. Carry the bundle alone (B, default target/xb/pending) with
# main's bench_report copied into it as head-bench_report.gz (the bundle's own, examples/
# bench_report.gz, is the "new" one; run-suite.sh unpacks it in place, so either name is used).
# The logs come back as one archive (the device tool returns at most 8 files).
#   run(command="bash pending/calls/suite-and-compare.sh", carry=["target/xb/pending"])
# Used on 2026-12-07 for router-bwd-mma + no-dy (then with --no-quick): suite 235 s, four
# bench_report runs of six configurations 180 s, racecheck the rest. The short pass adds ~90 s.
set -u
S=$SECONDS
b=${B:-target/xb/pending}
cfgs=${CFGS:-SM1 SM7 SM30 Q3 A C}
race_bins=${RACE_BINS:-gpu_backward,gpu_gemm_paths}
cat $b/COMMIT > $OUT/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 420 bash $b/run-suite.sh --sanitizers memcheck,initcheck,synccheck \
  --sanitizer-jobs 14 > $OUT/suite.log 2>&1
echo "suite rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [[ -f $b/head-bench_report.gz ]]; then
  gunzip -c $b/head-bench_report.gz > /tmp/head-br
  if [[ -f $b/examples/bench_report.gz ]]; then gunzip -c $b/examples/bench_report.gz > /tmp/new-br
  else cp $b/examples/bench_report /tmp/new-br; fi
  chmod +x /tmp/head-br /tmp/new-br
  for round in 1 2; do
    for v in new head; do
      left=$((540 - (SECONDS - S))); [[ $left -lt 60 ]] && break 2
      timeout $left /tmp/$v-br --quick --path hopper $cfgs > $OUT/$v-$round.log 2>&1
      echo "$v round $round rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
    done
  done
fi
left=$((570 - (SECONDS - S)))
if [[ $left -gt 30 ]]; then
  timeout $left bash $b/run-suite.sh --sanitizers-only --bins $race_bins --sanitizers racecheck \
    --sanitizer-jobs 14 --racecheck-jobs 8 --sanitizer-deadline $((left - 8)) > $OUT/race.log 2>&1
  echo "race rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
fi
cat $OUT/commit.txt $OUT/gpu.txt $OUT/rc.txt
grep -E "TOTAL|FAILED|panicked" $OUT/suite.log | tail -8
grep -hE "^\s*(memcheck|initcheck|synccheck|racecheck) " $OUT/suite.log $OUT/race.log 2>/dev/null | grep -v " 0 errors$" | tail -8
for f in $OUT/*-?.log; do
  echo "== $(basename $f)"; grep -E "^[A-Z0-9]+ +uniform +ReMoE +hopper +0|FAILED" $f | cut -c1-110
done
cd $OUT && tar czf all.tgz --remove-files *
