#!/usr/bin/env bash
# Runs the fuzz targets (all, or those named) one after the other, SECONDS_PER_TARGET each, one
# process at a time under nice, with issue 16's limits: no input may run 10 s (-timeout) or use more
# than 1 GB (-rss_limit_mb, and -malloc_limit_mb for any single allocation). Needs a nightly
# toolchain and cargo-fuzz.
#
#     SECONDS_PER_TARGET=300 fuzz/campaign.sh [TARGET...]
#
# The targets are built once (`cargo fuzz build -O`, into $FUZZ_TARGET_DIR, default fuzz/target;
# SKIP_BUILD=1 runs what is built), then run directly. New inputs go into $CORPUS/<target> (default
# fuzz/corpus, the committed seeds: `cargo fuzz cmin` them before committing), crashes into
# fuzz/artifacts/<target>, one log per target into $LOGS. Exits 1 if any target crashed, timed out or
# ran out of memory (the log's tail is printed).
# Do not pause a running target (SIGSTOP, to quiet the machine for a benchmark): libFuzzer's timer keeps
# counting, and on SIGCONT the input it was on is reported as a timeout (every such artifact ran in < 10 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SECONDS_PER_TARGET:-300}
corpus=${CORPUS:-fuzz/corpus}
logs=${LOGS:-/tmp/vicuna-fuzz-logs}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
mkdir -p "$logs"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  nice -n 19 cargo +nightly fuzz build -O --target-dir "$target_dir"
fi
bin="$target_dir/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
failed=()
for t in "${targets[@]}"; do
  dict=()
  case $t in
    gguf) dict=(-dict=fuzz/dicts/gguf.dict) ;;
    pickle | torch_zip) dict=(-dict=fuzz/dicts/pickle.dict) ;;
    config_json | tokenizer_json) dict=(-dict=fuzz/dicts/json.dict) ;;
    tgi_request | openai_request) dict=(-dict=fuzz/dicts/request.dict) ;;
  esac
  mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
  echo "--- fuzz $t: $seconds s"
  if nice -n 19 "$bin/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$seconds" \
    -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 "${dict[@]}" \
    "$corpus/$t" >"$logs/$t.log" 2>&1; then
    grep -E '^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb' "$logs/$t.log" | tr '\n' ' '
    echo
  else
    failed+=("$t")
    tail -40 "$logs/$t.log"
    echo "--- fuzz $t: FAILED (whole log: $logs/$t.log)"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that failed: ${failed[*]}" >&2
  exit 1
fi
