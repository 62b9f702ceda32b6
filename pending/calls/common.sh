# Sourced by the device calls here (bash). Needs S (the call's start, $SECONDS) and OUT.

# The cuBLAS baselines load libcublas at run time: put the toolkit's (or a wheel's) on the path.
cublas_on_path() {
  if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    local lib
    lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.1*' 2>/dev/null | head -1)
    [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  return 0
}

# unpack SRC DST: SRC.gz (a bundle's binary) or SRC itself (one run-suite.sh has unpacked) to DST.
unpack() {
  if [[ -f $1.gz ]]; then gunzip -c $1.gz > $2; else cp $1 $2; fi
  chmod +x $2
}

# bench_rounds CFGS: /tmp/new-br and /tmp/head-br alternated, new first, up to three rounds each,
# none started with less than 60 s left before DEADLINE (s after S, default 560), so that clocks
# and heat fall on both alike. Logs: $OUT/<new|head>-<round>.log; lines in $OUT/rc.txt.
bench_rounds() {
  local round v left
  for round in 1 2 3; do
    for v in new head; do
      left=$((${DEADLINE:-560} - (SECONDS - S))); [[ $left -lt 60 ]] && return 0
      timeout $left /tmp/$v-br --quick --path hopper $1 > $OUT/$v-$round.log 2>&1
      echo "$v round $round rc=$? $((SECONDS - S))s" >> $OUT/rc.txt
    done
  done
}
