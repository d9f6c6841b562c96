#!/usr/bin/env bash
# One-shot check on a machine with a real GPU (under 8 minutes): the kernel tests, the conv
# and step benchmarks (each validates its result before timing), the same ResNet-20 and
# ResNet-56 step in PyTorch fp32 (cuDNN, TF32 off) on the same GPU, and the ratio.
#
#   scripts/gpu-bench.sh              # builds with cargo, writes gpu-bench/ (logs, JSON)
#   scripts/gpu-bench.sh --out DIR    # another output directory
#
# Without cargo (a bare machine), point --bins at a directory holding prebuilt `step`,
# `conv2d` and test binaries (`cargo bench --no-run` and `cargo test --release --no-run`
# put them under target/release/deps). Without PyTorch the ratio is skipped, and said so.
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu-bench
bins=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --bins) bins="$2"; shift 2 ;;
        *) echo "gpu-bench: unknown argument '$1' (use --out DIR, --bins DIR)" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
start=$(date +%s)
status=0
say() { echo "== $* ($(( $(date +%s) - start )) s)"; }

# A bench or test binary: from cargo, or the newest prebuilt one of that name.
run_bin() {
    local kind="$1" name="$2"; shift 2
    if [ -z "$bins" ]; then
        if [ "$kind" = bench ]; then cargo bench --bench "$name" -- "$@"; else cargo test --release --test "$name" -- "$@"; fi
    else
        local b
        b=$(ls -t "$bins/$name"-* 2>/dev/null | grep -v '\.d$' | head -1)
        if [ -z "$b" ]; then echo "gpu-bench: no prebuilt $name in $bins" >&2; return 1; fi
        "$b" "$@"
    fi
}

say "adapters"
if [ -z "$bins" ]; then cargo run --release --quiet -- devices | tee "$out/devices.txt"; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"

say "kernel tests"
for t in conv2d batch_norm elementwise shortcut sgd linear pool cross_entropy residual_block runtime; do
    run_bin test "$t" --quiet >"$out/test-$t.log" 2>&1 || { echo "FAILED: tests/$t.rs (see $out/test-$t.log)"; status=1; }
done

say "conv benchmark"
run_bin bench conv2d --quick --tiles 2>&1 | tee "$out/conv2d.md" || status=1

py=""
for p in python3 python; do
    if command -v "$p" >/dev/null && "$p" -c "import torch" 2>/dev/null; then py="$p"; break; fi
done

for depth in 20 56; do
    say "ResNet-$depth step"
    run_bin bench step --model "$depth" --batch 128 --input 3,32,32 --iters 10 --warmup 3 --timed 1 2>&1 \
        | tee "$out/step-$depth.md" || status=1
    ours=$(grep '^STEP ' "$out/step-$depth.md" | sed 's/^STEP //' | tee "$out/step-$depth.json" \
        | sed -n 's/.*"images_per_second":\([0-9.e+-]*\).*/\1/p')
    if [ -n "$py" ]; then
        "$py" benches/pytorch_step.py --depth "$depth" --batch 128 --device cuda 2>&1 | tee "$out/pytorch-$depth.txt"
        theirs=$(sed -n 's/.*"img_per_s": \([0-9.e+-]*\).*/\1/p' "$out/pytorch-$depth.txt")
        if [ -n "$ours" ] && [ -n "$theirs" ]; then
            echo "RATIO ResNet-$depth: featreplay $ours img/s, PyTorch fp32 $theirs img/s: $(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')x" \
                | tee -a "$out/summary.txt"
        fi
    else
        echo "ResNet-$depth: featreplay ${ours:-?} img/s; PyTorch not importable here, ratio not measured" | tee -a "$out/summary.txt"
    fi
done
say "done"
exit $status
