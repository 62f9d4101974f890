#!/usr/bin/env bash
# vicuna against llama.cpp on the same synthetic 13b-shape GGUF files, same thread counts, in one run: prompt
# tokens/s (pp) and generated tokens/s (tg), mean ± sd, each vicuna figure with its ratio to llama.cpp, and the
# peak RSS of each process (GNU time), and the weight bytes per second vicuna's decoding reads (tg × the bytes of
# every layer matrix and the output matrix), to set against the machine's STREAM bandwidth. llama.cpp comes from PyPI's llama-cpp-python, which compiles it from source
# for this CPU, in a virtual environment outside the repository. Not part of CI (needs ~30 GB of disk, ~1 hour).
#
# Usage: bench/vs_llamacpp.sh [SHAPE] [TYPES] [THREADS]
#   SHAPE    tiny | 1b | 7b | 13b            (default 13b)
#   TYPES    comma-separated GGUF types      (default q4_0,q8_0,q4_k_m)
#   THREADS  comma-separated thread counts   (default 1,2)
# Environment: P (prompt tokens, default 512), N (generated tokens, default 128), REPS (default 3),
#   WORK (where the GGUF files are kept between runs, default /tmp/vicuna-bench-gguf),
#   VENV (default ~/.cache/vicuna-bench/llamacpp-venv), VICUNA (the binary, default target/release/vicuna),
#   LLAMACPP (what pip installs into a new VENV, default llama-cpp-python: the latest; e.g. llama-cpp-python==0.3.8,
#   which vendors llama.cpp 7841fc7 of March 2025, near the build b4748 the issue quotes),
#   LLAMA_BENCH (a llama-bench binary: when set, llama.cpp is measured with it instead of through the Python
#   bindings, and no VENV is needed. Build it from the llama.cpp that the llama-cpp-python sdist vendors; on Intel
#   Xeons with AMX that the VM does not enable, GGML_NATIVE builds die with SIGILL, so pass the ISA explicitly:
#   cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
#   -DGGML_AVX512_VBMI=ON && cmake --build build --target llama-bench).
# Build first: cargo build --release -p vicuna
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPE=${1:-13b}
TYPES=${2:-q4_0,q8_0,q4_k_m}
THREADS=${3:-1,2}
P=${P:-512}
N=${N:-128}
REPS=${REPS:-3}
WORK=${WORK:-/tmp/vicuna-bench-gguf}
VENV=${VENV:-$HOME/.cache/vicuna-bench/llamacpp-venv}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time is required (apt-get install time)" >&2; exit 1; }

if [ -n "${LLAMA_BENCH:-}" ]; then
  [ -x "$LLAMA_BENCH" ] || { echo "LLAMA_BENCH=$LLAMA_BENCH is not an executable" >&2; exit 1; }
elif [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "installing llama-cpp-python into $VENV (compiles llama.cpp: several minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --quiet "${LLAMACPP:-llama-cpp-python}"
fi

mkdir -p "$WORK"
peak_mb() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], 0))' "$1" "$2"; }
# llama.cpp's pp/tg figures as {pp_tps, pp_sd, tg_tps, tg_sd}: from llama-bench's JSON, or from the Python bindings.
llamacpp_bench() { # FILE THREADS
  if [ -n "${LLAMA_BENCH:-}" ]; then
    "$LLAMA_BENCH" -m "$1" -p "$P" -n "$N" -t "$2" -r "$REPS" -o json 2>/dev/null | python3 -c '
import json, sys
out = {}
for run in json.load(sys.stdin):
    test = "pp" if run["n_prompt"] > 0 else "tg"
    out[test + "_tps"], out[test + "_sd"] = run["avg_ts"], run["stddev_ts"]
print(json.dumps(out))'
  else
    "$VENV/bin/python" bench/llamacpp_bench.py "$1" -p "$P" -n "$N" -t "$2" -r "$REPS"
  fi
}
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p') model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) CPUs"

printf '%-8s %-3s %-22s %-22s %-22s %-22s %-7s %-7s %-10s %s\n' type thr "vicuna pp$P" "llama.cpp pp$P" "vicuna tg$N" \
  "llama.cpp tg$N" "pp x" "tg x" "tg GB/s" "peak RSS MB (vicuna / llama.cpp / file)"
for TYPE in ${TYPES//,/ }; do
  FILE="$WORK/synth-$SHAPE-$TYPE.gguf"
  [ -f "$FILE" ] || "$VICUNA" synth --shape "$SHAPE" --type "$TYPE" --seed 1 --out "$FILE" --quiet >/dev/null
  FILE_MB=$(( $(stat -c %s "$FILE") / 1048576 ))
  for T in ${THREADS//,/ }; do
    # The two engines alternate on the same file, so both see the same page cache and about the same host load.
    /usr/bin/time -v -o "$WORK/vicuna.time" "$VICUNA" --threads "$T" bench --model "$FILE" -p "$P" -n "$N" \
      -r "$REPS" --json > "$WORK/vicuna.json"
    /usr/bin/time -v -o "$WORK/llamacpp.time" bash -c "$(declare -f llamacpp_bench); P=$P N=$N REPS=$REPS \
      LLAMA_BENCH=${LLAMA_BENCH:-} VENV=$VENV llamacpp_bench $FILE $T" > "$WORK/llamacpp.json"
    read -r VPP VPS VTG VTS < <(for k in pp_tps pp_sd tg_tps tg_sd; do json_field "$WORK/vicuna.json" $k; done | xargs)
    read -r LPP LPS LTG LTS < <(for k in pp_tps pp_sd tg_tps tg_sd; do json_field "$WORK/llamacpp.json" $k; done | xargs)
    VGB=$(json_field "$WORK/vicuna.json" tg_weight_gb_per_s)
    printf '%-8s %-3s %-22s %-22s %-22s %-22s %-7s %-7s %-10s %s / %s / %s\n' "$TYPE" "$T" \
      "$(printf '%.2f ± %.2f' "$VPP" "$VPS")" "$(printf '%.2f ± %.2f' "$LPP" "$LPS")" \
      "$(printf '%.2f ± %.2f' "$VTG" "$VTS")" "$(printf '%.2f ± %.2f' "$LTG" "$LTS")" \
      "$(awk -v a="$VPP" -v b="$LPP" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" \
      "$(awk -v a="$VTG" -v b="$LTG" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')" \
      "$(printf '%.1f' "$VGB")" "$(peak_mb "$WORK/vicuna.time")" "$(peak_mb "$WORK/llamacpp.time")" "$FILE_MB"
  done
done
if [ -n "${LLAMA_BENCH:-}" ]; then
  echo "llama.cpp: $LLAMA_BENCH, build $("$LLAMA_BENCH" --version 2>&1 | grep -o 'version: .*' | head -1); vicuna: $("$VICUNA" --version)"
else
  echo "llama.cpp: llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'); vicuna: $("$VICUNA" --version)"
fi
echo "vicuna's kernels: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["cpu"]; print(c["isa"], "prefetch", c["prefetch"], "(" + c["prefetch_source"] + ")")' "$WORK/vicuna.json")"
