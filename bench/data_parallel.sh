#!/usr/bin/env bash
# Data-parallel throughput on one machine: 1 process x 2 threads against 2 processes x 1
# thread (mpirun), for seed-cnn and vgg with syncbn and bn, alternating the two sides ROUNDS
# times. Prints training images/s (from metrics.json; every epoch after the first) and the
# share of the 2-process step spent in communication (all-reductions and waiting for the
# other process, timed inside normlab).
# Usage: bench/data_parallel.sh [ROUNDS]   (needs normlab built with --features mpi)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NORMLAB_BIN:-$ROOT/target/release/normlab}
ROUNDS=${1:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

summary() {
    python3 - "$1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
e = m["epochs"][1:] or m["epochs"]
rate = sum(x["images_per_sec"] for x in e) / len(e)
comm = sum(x.get("communication_seconds", 0) for x in e) / sum(x["seconds"] for x in e)
print(f"{rate:.0f} {comm:.3f}")
PY
}

printf '%-10s %-7s %-6s %12s %12s %8s %10s\n' model norm batch "1x2 img/s" "2x1 img/s" ratio "comm share"
for spec in "seed-cnn 20000 128" "vgg 6000 128"; do
    set -- $spec
    model=$1 limit=$2 batch=$3
    for norm in syncbn bn; do
        args=(train --model "$model" --norm "$norm" --train-limit "$limit" --test-limit 500 --epochs 3
              --batch-size "$batch")
        best1=0 best2=0 share=0
        for r in $(seq 1 "$ROUNDS"); do
            rm -rf "$WORK/a" "$WORK/b"
            "$BIN" "${args[@]}" --threads 2 --out "$WORK/a" >/dev/null
            mpirun -n 2 --bind-to none "$BIN" "${args[@]}" --threads 1 --out "$WORK/b" >/dev/null
            read -r r1 _ <<<"$(summary "$WORK/a")"
            read -r r2 c2 <<<"$(summary "$WORK/b")"
            ((r1 > best1)) && best1=$r1
            if ((r2 > best2)); then best2=$r2; share=$c2; fi
        done
        printf '%-10s %-7s %-6s %12s %12s %8s %10s\n' "$model" "$norm" "$batch" "$best1" "$best2" \
            "$(python3 -c "print(f'{$best2/$best1:.2f}x')")" "$share"
    done
done
