#!/usr/bin/env bash
# FR over MPI against the in-process pipeline, side by side on this machine.
#
#   cargo build --release --features mpi && scripts/ensure-gpu.sh benches/mpi.sh [rounds]
#
# Runs, alternately (the machine is noisy), FR at K = 2 in one process (two devices, two
# threads) and as two MPI processes, then FR at K = 2 x R = 2 on four processes. Each run is
# ResNet-20 on 1024 embedded images, batch 128 (8 iterations an epoch), two epochs at a
# constant learning rate; epoch 1 compiles the pipelines, so the time per iteration is epoch
# 2's. Transfer time per iteration is what the MPI links log (RUST_LOG=info) for epoch 2:
# reading the computed tensor back, encoding and sending it, and receiving, decoding and
# uploading what arrived (waiting for a neighbour still computing is left out).
set -euo pipefail
rounds=${1:-2}
bin=${FEATREPLAY:-target/release/featreplay}
out=${OUT:-/tmp/featreplay-bench-mpi}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun=(mpirun --oversubscribe --bind-to none)
args=(train --algo fr --splits 2 --depth 20 --train-subset 1024 --test-subset 256 --batch-size 128
      --epochs 2 --schedule 2 --gammas 0.1 --quiet --overwrite)
rm -rf "$out" && mkdir -p "$out"

epoch2() { # seconds per iteration in epoch 2 of run directory $1
    python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]+'/metrics.jsonl')][1]; print(f\"{r['epoch_seconds']/8:.3f}\")" "$1"
}
links() { # per stage: transfer seconds per iteration in epoch 2, from the links' log $1
    python3 - "$1" <<'PY'
import re, sys
per = {}
for line in open(sys.argv[1]):
    m = re.search(r"stage (\d+) links: (\d+) sends \(([\d.]+) MB\) in ([\d.]+) s; (\d+) receives: ([\d.]+) s waiting, ([\d.]+) s receiving", line)
    if m:
        per.setdefault(m.group(1), []).append(m.groups())
out = []
for stage, rows in sorted(per.items()):
    _, sends, mb, send_s, recvs, wait_s, recv_s = rows[-1]  # the last epoch's links
    out.append(f"stage {stage}: {float(send_s)/8*1e3:.1f} ms send + {float(recv_s)/8*1e3:.1f} ms receive ({float(mb)/8:.1f} MB sent), {float(wait_s)/8*1e3:.1f} ms waiting")
print("; ".join(out))
PY
}

for i in $(seq "$rounds"); do
    "$bin" "${args[@]}" --out "$out/local$i" > /dev/null
    RUST_LOG=featreplay=info "${mpirun[@]}" -np 2 "$bin" "${args[@]}" --transport mpi --out "$out/mpi$i" > /dev/null 2> "$out/mpi$i.log"
    echo "round $i: FR K=2 s/iteration: one process $(epoch2 "$out/local$i"), two MPI processes $(epoch2 "$out/mpi$i") ($(links "$out/mpi$i.log"))"
done
RUST_LOG=featreplay=info "${mpirun[@]}" -np 4 "$bin" "${args[@]}" --transport mpi --replicas 2 --out "$out/r2" > /dev/null 2> "$out/r2.log"
echo "FR K=2 x R=2 on 4 processes: $(epoch2 "$out/r2") s/iteration ($(links "$out/r2.log"))"
