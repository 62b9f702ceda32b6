#!/usr/bin/env bash
# The ping-pong row GEMMs' first device call (pending/pingpong.patch): every GPU test binary of
# the bundle on both paths (no sanitizers, no short pass; BINS=a,b for some), then the bundle's latency and
# bench_report against the baseline's (C, default target/xb/cmp3: head-bench_report.gz and
# head-latency.gz, the kernels of 84e31fc), alternated new, head, new, head, so that clocks and
# heat fall on both alike. Carry the bundle's tests, examples and run-suite.sh, and C:
#   run(command="bash pending/calls/pingpong.sh",
#       carry=["target/xb/pending/tests", "target/xb/pending/examples",
#              "target/xb/pending/run-suite.sh", "target/xb/pending/COMMIT", "target/xb/cmp3"])
# CFGS (default SM1 SM7 SM30 Q3 A C), DEADLINE (s, default 560).
# The logs come back as one archive (the device tool returns at most 8 files).
set -u
S=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
b=${B:-target/xb/pending}
c=${C:-target/xb/cmp3}
cfgs=${CFGS:-SM1 SM7 SM30 Q3 A C}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
cat $b/COMMIT $c/COMMIT > $OUT/commit.txt
timeout ${TEST_TIMEOUT:-280} bash $b/run-suite.sh --no-sanitizer --no-quick \
  ${BINS:+--bins $BINS} > $OUT/suite.log 2>&1
echo "tests rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
cublas_on_path
unpack $b/examples/bench_report /tmp/new-br
unpack $c/head-bench_report /tmp/head-br
# The latency pair when the call carried the head's (L, default target/xb/cmp3lat: the carry
# limit does not take it beside the whole suite).
l=${L:-target/xb/cmp3lat}
if [[ -f $l/head-latency.gz ]]; then
  unpack $b/examples/latency /tmp/new-lat
  unpack $l/head-latency /tmp/head-lat
  for v in new head; do
    timeout 120 /tmp/$v-lat --tokens ${LAT_TOKENS:-1,8,64} --json $OUT/latency-$v.json \
      > $OUT/latency-$v.log 2>&1
    echo "latency $v rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
  done
fi
bench_rounds "$cfgs"
cd $OUT && tar czf logs.tgz *.log *.json *.txt 2>/dev/null
cat rc.txt; tail -25 suite.log
