#!/usr/bin/env bash
# Benchmarks `vicuna apply-delta` on a synthesized base/delta pair: wall time, MB/s of input read
# and peak RSS (from /usr/bin/time -v), against the same disk's plain `cat` of the inputs plus a
# write of the same number of output bytes, synced (apply-delta syncs its shards before renaming
# the folder into place). The two alternate RUNS times, so both see the same page-cache state
# and, on a shared machine, about the same load; best and median are printed.
#
# Usage: bench/apply_delta.sh [SHAPE] [DTYPE] [WORKDIR]
#   SHAPE    tiny | 1b | 7b | 13b   (default 1b: 2.2 GB per model in f16)
#   DTYPE    f16 | f32 | bf16       (default f16; the target is always f16)
#   WORKDIR  scratch folder, deleted at the end (default /tmp/vicuna-bench-apply-delta)
# Environment: VICUNA = the binary (default: $CARGO_TARGET_DIR or target, release build);
#              RUNS = repetitions (default 3).
# Build first: cargo build --release -p vicuna
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPE=${1:-1b}
DTYPE=${2:-f16}
WORK=${3:-/tmp/vicuna-bench-apply-delta}
RUNS=${RUNS:-3}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is required (apt-get install time)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

# The base has LLaMA's 32000 tokens, the delta one more ([PAD]), as StableVicuna's.
"$VICUNA" synth --shape "$SHAPE" --dtype "$DTYPE" --vocab 32000 --seed 1 --out "$WORK/base" --quiet >/dev/null
"$VICUNA" synth --shape "$SHAPE" --dtype "$DTYPE" --vocab 32001 --seed 2 --out "$WORK/delta" --quiet >/dev/null
INPUT_BYTES=$(cat "$WORK"/base/*.safetensors "$WORK"/delta/*.safetensors | wc -c)

wall_seconds() { # "Elapsed (wall clock) time (h:mm:ss or m:ss): 0:12.34" -> seconds
  awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$1"
}
peak_kb() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1"; }

OUTPUT_BYTES=0
: > "$WORK/apply.txt"
: > "$WORK/baseline.txt"
for run in $(seq "$RUNS"); do
  rm -rf "$WORK/target" "$WORK/written.bin"
  sync
  /usr/bin/time -v -o "$WORK/time.txt" "$VICUNA" apply-delta --base "$WORK/base" --delta "$WORK/delta" \
    --target "$WORK/target" --quiet >/dev/null
  echo "$(wall_seconds "$WORK/time.txt") $(peak_kb "$WORK/time.txt")" >> "$WORK/apply.txt"
  OUTPUT_BYTES=$(cat "$WORK"/target/*.safetensors | wc -c)
  rm -rf "$WORK/target"
  sync
  /usr/bin/time -v -o "$WORK/time.txt" bash -c "
    cat '$WORK'/base/*.safetensors '$WORK'/delta/*.safetensors > /dev/null
    head -c $OUTPUT_BYTES /dev/zero > '$WORK/written.bin'
    sync '$WORK/written.bin'
  "
  echo "$(wall_seconds "$WORK/time.txt")" >> "$WORK/baseline.txt"
done

stats() { sort -n -k1,1 "$1" | awk '{ v[NR] = $1; if ($2 > rss) rss = $2 } END { printf "%s %s %s\n", v[1], v[int((NR + 1) / 2)], rss }'; }
read -r BEST MEDIAN RSS_KB < <(stats "$WORK/apply.txt")
read -r BASE_BEST BASE_MEDIAN _ < <(stats "$WORK/baseline.txt")

awk -v shape="$SHAPE" -v dtype="$DTYPE" -v input="$INPUT_BYTES" -v output="$OUTPUT_BYTES" -v runs="$RUNS" \
  -v best="$BEST" -v median="$MEDIAN" -v rss="$RSS_KB" -v bbest="$BASE_BEST" -v bmedian="$BASE_MEDIAN" 'BEGIN {
  printf "shape %s %s: input %.2f GB (base + delta), output %.2f GB, %d runs each\n", shape, dtype, input / 1e9, output / 1e9, runs
  printf "apply-delta: wall best %.2f s / median %.2f s, input read %.0f / %.0f MB/s, peak RSS %.0f MB (largest of the runs)\n", best, median, input / 1e6 / best, input / 1e6 / median, rss / 1024
  printf "baseline (cat inputs + write and sync output bytes): wall best %.2f s / median %.2f s, %.0f / %.0f MB/s of input\n", bbest, bmedian, input / 1e6 / bbest, input / 1e6 / bmedian
  printf "apply-delta throughput: %.0f%% of the baseline (best vs best), %.0f%% (median vs median)\n", 100 * bbest / best, 100 * bmedian / median
}'
