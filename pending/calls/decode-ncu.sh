#!/usr/bin/env bash
# Device call: the persistent decode kernel under ncu (issue 25: where its fixed cost of about
# 28 us at E8k1 T 1 goes), then racecheck of RACE_BINS to a deadline. Carry:
#   run(command="bash pending/calls/decode-ncu.sh",
#       carry=["target/xb/cmp2", "target/xb/pending/tests", "target/xb/pending/run-suite.sh",
#              "target/xb/pending/COMMIT"])
# RACE_BINS="" skips the racecheck (for a call that runs suite-and-compare.sh after it, with
# OUT set to a folder of its own: OUT=$OUT/ncu).
# One launch per shape (the sixth, so the first launches' cold instruction caches and lazy
# module loading are past), ncu's default cache flush, boost clocks left alone; the sections
# that say where warps wait (WarpStateStats, SourceCounters' per-instruction stall samples)
# and how busy DRAM is. The per-instruction table comes back as CSV (sass.csv per shape).
set -u
S=$SECONDS
c=${C:-target/xb/cmp2}
b=${B:-target/xb/pending}
shapes=${SHAPES:-E8k1:1 E64k8:8}
race_bins=${RACE_BINS-gpu_soundness,gpu_safety,gpu_router,gpu_controller,gpu_f16_and_bounds,unit}
mkdir -p $OUT
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
cat $c/COMMIT > $OUT/commit.txt 2>/dev/null
gunzip -c $c/latency.gz > /tmp/latency && chmod +x /tmp/latency
"$ncu" --version | tail -1 >> $OUT/gpu.txt
# PM sampling (a timeline of the kernel's counters: when DRAM starts streaming after the router's
# barrier) where this ncu has the section; the 2026-12-07 run did not ask for it.
"$ncu" --list-sections > $OUT/sections.txt 2>&1
pm=(); grep -q '^ *PmSampling ' $OUT/sections.txt && pm=(--section PmSampling)
for st in $shapes; do
  sh=${st%%:*}; t=${st##*:}
  timeout 150 "$ncu" --clock-control none -k regex:decode_forward --launch-skip 5 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats --section SourceCounters "${pm[@]}" \
    -o $OUT/$sh-t$t -f /tmp/latency --iters 8 --tokens $t --shapes $sh > $OUT/$sh-t$t.log 2>&1
  echo "ncu $sh T $t rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
  "$ncu" -i $OUT/$sh-t$t.ncu-rep --print-details all > $OUT/$sh-t$t-details.txt 2>&1
  "$ncu" -i $OUT/$sh-t$t.ncu-rep --page source --csv --print-source sass > $OUT/$sh-t$t-sass.csv 2>&1
done
left=$((570 - (SECONDS - S)))
if [[ -n $race_bins && -f $b/run-suite.sh && $left -gt 60 ]]; then
  timeout $left bash $b/run-suite.sh --sanitizers-only --bins $race_bins --sanitizers racecheck \
    --sanitizer-jobs 14 --racecheck-jobs 8 --sanitizer-deadline $((left - 8)) > $OUT/race.log 2>&1
  echo "race rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
fi
cat $OUT/commit.txt $OUT/gpu.txt $OUT/rc.txt
for f in $OUT/*-details.txt; do
  echo "== $(basename $f)"
  grep -E "^\s*(Duration|DRAM Throughput|Compute \(SM\) Throughput|No Eligible|Warp Cycles Per Issued|L2 Hit Rate) " $f | head -8
done
grep -hE "^\s*racecheck " $OUT/race.log 2>/dev/null | tail -12
cd $OUT && tar czf all.tgz --remove-files *
