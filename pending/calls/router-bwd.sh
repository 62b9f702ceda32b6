#!/usr/bin/env bash
# One device call for pending/router-bwd-mma.patch, from the bundle `PENDING_PATCHES="router-bwd-mma"
# pending/bundle-all.sh` with target/xb/cmp/router-bwd-check copied into it (about 59 MB: carry
# ["target/xb/pending"] alone): the standalone check under the four sanitizers (its small
# shapes), the whole suite on both paths, then memcheck and racecheck of gpu_backward until about
# 200 s. Written for the last 244 s of a session's device budget; with more, run the suite's own
# sanitizers over every binary instead.
set -u
S=$SECONDS
b=target/xb/pending
cat $b/COMMIT > $OUT/commit.txt; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
chmod +x $b/router-bwd-check
for tool in memcheck racecheck initcheck synccheck; do
  extra=""; [[ $tool == racecheck ]] && extra="--racecheck-report hazard"
  timeout 60 compute-sanitizer --tool $tool $extra $b/router-bwd-check --quick --no-time > $OUT/check-$tool.log 2>&1
  echo "check $tool rc=$? $((SECONDS-S))s: $(grep -E 'SUMMARY' $OUT/check-$tool.log | tail -1)" >> $OUT/rc.txt
done
timeout 140 bash $b/run-suite.sh --no-sanitizer --no-quick > $OUT/suite.log 2>&1; echo "suite rc=$? $((SECONDS-S))s" >> $OUT/rc.txt
left=$((200 - (SECONDS - S)))
if [[ $left -gt 25 ]]; then
  timeout $left bash $b/run-suite.sh --sanitizers-only --bins gpu_backward --sanitizers memcheck,racecheck --sanitizer-jobs 14 --racecheck-jobs 8 --sanitizer-deadline $((left - 8)) > $OUT/san.log 2>&1; echo "san rc=$? $((SECONDS-S))s" >> $OUT/rc.txt
fi
cat $OUT/commit.txt $OUT/gpu.txt $OUT/rc.txt; grep -E "passed|TOTAL" $OUT/suite.log | tail -28; grep -E "memcheck|racecheck" $OUT/san.log | tail -4
cd $OUT && tar czf all.tgz --remove-files *
