#!/usr/bin/env bash
# The matvec kernels in GGUF's layout against the kernels' own (interleaved) layout, alternated round by round on
# one matrix, weights from DRAM: GB/s per layout and thread count, best and median of the rounds. On a shared
# host, alternating in one sitting is what makes the two comparable.
#
# Usage: bench/layout_ab.sh [TYPE] [SHAPE]        (defaults: q4_0 13824x5120)
# Environment: N (rounds, default 6), PREFETCH (VICUNA_KERNELS_PREFETCH for both, default: the CPU's table)
# Build first: cargo build --release -p vicuna-kernels --example kernel_bench
set -euo pipefail
cd "$(dirname "$0")/.."
TYPE=${1:-q4_0}
SHAPE=${2:-13824x5120}
N=${N:-6}
BENCH=${CARGO_TARGET_DIR:-target}/release/examples/kernel_bench
[ -x "$BENCH" ] || { echo "no $BENCH: cargo build --release -p vicuna-kernels --example kernel_bench" >&2; exit 1; }
[ -n "${PREFETCH:-}" ] && export VICUNA_KERNELS_PREFETCH=$PREFETCH
for _ in $(seq "$N"); do
  for layout in ggml best; do
    "$BENCH" --types "$TYPE" --threads 1,2 --shapes "$SHAPE" --seconds 0.5 --batch 1 --layout "$layout" |
      tail -2 | awk -v l="$layout" '{print l, $3, $5}'
  done
done | python3 -c '
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in sys.stdin:
    layout, threads, gbps = line.split()
    runs[(threads, layout)].append(float(gbps))
print("threads layout       median   best   (GB/s, every round)")
for (threads, layout), v in sorted(runs.items()):
    name = "ggml" if layout == "ggml" else "interleaved"
    print(f"{threads:>7} {name:<12} {statistics.median(v):6.1f} {max(v):6.1f}   {v}")
'
lscpu | grep -m1 "Model name" || true
