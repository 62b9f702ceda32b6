#!/usr/bin/env bash
# The ping-pong row GEMMs' second device call: compute-sanitizer on the bundle, racecheck first
# (a schedule of warpgroups handing stages and units to each other is where a race would be) on
# the binaries whose tests run the row GEMMs most (RACE_BINS), then memcheck, synccheck and
# initcheck on SAN_BINS (default all), then, where the call carried them, the latency pair (L,
# default target/xb/cmp3lat, against the bundle's examples/latency). Each pass stops starting
# runs at its deadline; what did not run is named in the summary.
#   run(command="bash pending/calls/pingpong-san.sh",
#       carry=["target/xb/pending/tests", "target/xb/pending/run-suite.sh",
#              "target/xb/pending/COMMIT", "target/xb/pending/examples", "target/xb/cmp3lat"])
set -u
S=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
b=${B:-target/xb/pending}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
cat $b/COMMIT > $OUT/commit.txt
mkdir -p $OUT/race $OUT/san
OUT=$OUT/race timeout ${RACE_TIMEOUT:-260} bash $b/run-suite.sh --sanitizers-only \
  --sanitizers racecheck --racecheck-jobs ${RACE_JOBS:-4} \
  --bins ${RACE_BINS:-gpu_gemm_paths,gpu_forward,gpu_backward} \
  --sanitizer-deadline ${RACE_DEADLINE:-230} > $OUT/race.log 2>&1
echo "racecheck rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
OUT=$OUT/san timeout ${SAN_TIMEOUT:-230} bash $b/run-suite.sh --sanitizers-only \
  --sanitizers ${SANITIZERS:-memcheck,synccheck,initcheck} --sanitizer-jobs 14 \
  ${SAN_BINS:+--bins $SAN_BINS} --sanitizer-deadline ${SAN_DEADLINE:-200} > $OUT/san.log 2>&1
echo "sanitizers rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
l=${L:-target/xb/cmp3lat}
if [[ -f $l/head-latency.gz ]]; then
  for v in new head; do
    src=$b/examples/latency; [[ $v == head ]] && src=$l/head-latency
    unpack $src /tmp/$v-lat
    timeout 100 /tmp/$v-lat --tokens ${LAT_TOKENS:-1,8,64} --json $OUT/latency-$v.json \
      > $OUT/latency-$v.log 2>&1
    echo "latency $v rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
  done
fi
cd $OUT && tar czf logs.tgz *.log *.txt *.json race san 2>/dev/null
cat rc.txt; grep -hE "^(racecheck|memcheck|synccheck|initcheck) " race.log san.log | cut -c1-160
