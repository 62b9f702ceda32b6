#!/usr/bin/env bash
# Runs on the lent GPU machine, from the bundle `scripts/gpu-bundle --candle` makes in
# .gpu-bundle-train/ (the main job is too large to travel beside the test binaries):
#
#   run(command="bash .gpu-bundle-train/run-train.sh PHASE [EXTRA FLAGS]", carry=[".gpu-bundle-train"])
#
# The main job's evidence at the paper's 182M shape (docs/TRAINING.md), one phase per call, each
# inside the device tool's ten minutes:
#   remoe   ReMoE for the default five minutes, sampled after --prompt, saved to $CKPT;
#   topk    TopK for the same steps and learning rates, from that checkpoint: ReMoE resumes with
#           nothing left to train (its evaluation and plots again), then TopK trains. $CKPT lives
#           on the machine, not in the carried folder, so this call must follow `remoe` while the
#           machine is still held (it is given back after 30 s idle);
#   seeds   the validation comparison over seeds at a shorter budget: SEEDS pairs (default 2) from
#           seed SEED0 (default 0), each run SEED_STEPS steps (default 90: ReMoE reaches its
#           sparse stage at about step 80; a pair took 204 s on an H200, docs/TRAINING.md). Two pairs
#           fit one ten-minute call, so three seeds are two calls: `seeds`, then
#           `SEEDS=1 SEED0=2 bash .gpu-bundle-train/run-train.sh seeds`.
#   profile where one step's GPU time goes: ReMoE to step PROFILE_STEP (default 100, the sparse
#           stage) under ncu, which times each kernel of that step alone (`--profile-step`);
#           kernel-times.py sums them by kernel against the unprofiled steps' wall time
#           ($OUT/kernel-times.txt; the report is $OUT/ncu-profile.csv.gz). Not yet run on a GPU.
# What the job writes goes to $OUT/train-PHASE.tgz, its log to $OUT/train-PHASE.log; a short
# digest is printed last.
set -uo pipefail
prefix=()
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
phase="${1:?phase: remoe, topk or seeds}"
shift
out="${OUT:-$here/out}"
ckpt="${CKPT:-/tmp/remoe-main-ckpt}"
mkdir -p "$out"
for packed in "$here"/*.gz; do
  [[ -e "$packed" ]] && gunzip -f "$packed"
done
chmod +x "$here/train"
# candle links CUDA 13's libraries (libcublas.so.13, ...): the toolkit's folder on the loader path.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
  lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export REMOE_PLOT_FONT="${REMOE_PLOT_FONT:-$here/DejaVuSans.ttf}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "commit: $(cat "$here/COMMIT" 2>/dev/null | tr '\n' ' ')"
case "$phase" in
  remoe) flags=(--no-topk --save "$ckpt" --prompt "fn main() {") ;;
  topk)
    [[ -e "$ckpt" ]] || { echo "run-train.sh: no checkpoint at $ckpt (run the remoe phase first, on this machine)"; exit 2; }
    # --steps 0: ReMoE has nothing left to train; TopK replays its learning rates from the
    # checkpoint's history, so it trains the same steps (docs/TRAINING.md).
    flags=(--resume "$ckpt" --steps 0 --prompt "fn main() {") ;;
  seeds)
    flags=(--steps "${SEED_STEPS:-90}" --seeds "${SEEDS:-2}" --seed "${SEED0:-0}" --timing-steps 0
      --check-steps 0) ;;
  profile)
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    [[ -n "$ncu" ]] || { echo "run-train.sh: no ncu on this machine"; exit 2; }
    step="${PROFILE_STEP:-100}"
    # Only the profiled step's kernels are measured (the job brackets it with the profiler's
    # start and stop), one metric each: their durations, serialised by ncu.
    prefix=(timeout 560 "$ncu" --profile-from-start off --metrics gpu__time_duration.sum --csv
      --log-file "$out/ncu-profile.csv")
    flags=(--no-topk --steps $((step + 1)) --profile-step "$step" --timing-steps 0
      --check-steps 0 --val-bytes 16384) ;;
  *) echo "run-train.sh: unknown phase $phase"; exit 2 ;;
esac
start=$SECONDS
"${prefix[@]}" "$here/train" "${flags[@]}" "$@" --out "$out/train-$phase" >"$out/train-$phase.log" 2>&1
rc=$?
if [[ "$phase" == profile ]]; then
  # The unprofiled step's wall time: the median of the ten steps before the profiled one.
  wall=$(python3 -c '
import json, statistics, sys
log = json.load(open(sys.argv[1]))
tokens, p = log["config"]["tokens_per_step"], int(sys.argv[2])
print(statistics.median(1e3 * tokens / s["tokens_per_s"] for s in log["remoe"]["steps"] if p - 10 <= s["step"] < p))
' "$out/train-$phase/log.json" "$step" 2>/dev/null)
  python3 "$here/kernel-times.py" "$out/ncu-profile.csv" $wall >"$out/kernel-times.txt" 2>&1
  gzip -f "$out/ncu-profile.csv"
fi
(cd "$out" && tar czf "train-$phase.tgz" "train-$phase" && rm -rf "train-$phase")
echo "=== train $phase: rc=$rc, $((SECONDS - start)) s (log: train-$phase.log)"
# The digest: everything but the progress lines and the affinity tables' rows.
grep -vE '^ *\[|^ +[0-9]+ +[0-9. ]+$' "$out/train-$phase.log" | tail -70 | cut -c1-220
[[ "$phase" == profile ]] && cut -c1-160 "$out/kernel-times.txt"
exit $rc
