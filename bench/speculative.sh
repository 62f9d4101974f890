#!/usr/bin/env bash
# Single-stream decoding speed with and without speculative decoding, side by side in one run.
#
#   bench/speculative.sh MODEL [DRAFT_MODEL] [THREADS]
#
# For each prompt below (definition questions, and copy-heavy ones: quote, repeat, edit), greedy
# generation of up to 96 tokens with `vicuna generate` plain, with `--lookup`, and with
# `--draft-model DRAFT_MODEL` when one is given. Prints per prompt and mode the generated tokens,
# tokens/s of the decode phase (vicuna's own timing, VICUNA_LOG=info) and the share of guesses
# kept; then the mean speed-up over plain decoding. Greedy outputs are checked to be identical
# across modes (the run fails otherwise). Not part of CI.
#
# DRAFT_P_MIN=P passes --draft-p-min P to the draft mode.
#
# LLAMA_SPECULATIVE=PATH (llama.cpp's llama-speculative, built from the llama-cpp-python sdist's vendored source)
# adds llama.cpp on the same pair (MODEL and DRAFT_MODEL as GGUF files), same prompt, threads, greedy, up to 96
# tokens and --draft-max 8: its own "decoded ... speed" figure, and its share of drafts accepted.
#
# PROJECT=FILE (the 13b-shape q4_0 GGUF, say) adds what the measured acceptance would mean for that model:
# `vicuna bench --verify` times its k-row passes (k = 1..draft max + 1), and per mode
#   projected tokens/s = tokens per pass / t(rows per pass)
# where tokens per pass = tokens / passes, passes = tokens - kept guesses (each pass gives one token of its own
# plus the guesses it kept), rows per pass = 1 + guesses / passes, and t() interpolates the measured pass times.
# A PROJECTION, not a measurement: it assumes the big model keeps guesses as often as the demo model did, and it
# leaves out the draft model's own cost (an upper bound for --draft-model; lookup costs nothing).
#
# Example, the demo model with its own q4_0 file as the draft:
#   target/release/vicuna apply-delta --base models/demo/ship/base --delta models/demo/ship/delta --target /tmp/demo
#   target/release/vicuna quantize --model /tmp/demo --type q4_0 --out /tmp/demo-q4_0.gguf
#   bench/speculative.sh /tmp/demo /tmp/demo-q4_0.gguf 1
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench/speculative.sh MODEL [DRAFT_MODEL] [THREADS]}
DRAFT=${2:-}
THREADS=${3:-2}
VICUNA=${VICUNA:-target/release/vicuna}
[[ -x $VICUNA ]] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }

prompts=(
  "What is a house?"
  "What does run mean?"
  "Repeat this sentence exactly: a dwelling that serves as living quarters for one or more families."
  "Quote this back to me: the organic process of bearing flowers, the organic process of bearing flowers."
  "Fix the spelling: a violant release of energy caused by a chemical or nuclear reaction."
)
modes=(plain lookup)
[[ -n $DRAFT ]] && modes+=(draft)

echo "model $MODEL, draft ${DRAFT:-none}, $THREADS threads, $(lscpu | sed -n 's/^Model name: *//p')"
printf '%-10s %-8s %7s %10s %8s\n' prompt mode tokens tokens/s kept
declare -A total tokens drafted kept
for i in "${!prompts[@]}"; do
  prompt="### Human: ${prompts[$i]}
### Assistant:"
  reference=""
  for mode in "${modes[@]}"; do
    flags=()
    case $mode in
      lookup) flags=(--lookup) ;;
      draft) flags=(--draft-model "$DRAFT" ${DRAFT_P_MIN:+--draft-p-min "$DRAFT_P_MIN"}) ;;
    esac
    out=$(VICUNA_LOG=info "$VICUNA" -t "$THREADS" generate --model "$MODEL" --prompt "$prompt" --greedy \
      --max-new-tokens 96 --json "${flags[@]}" 2>/tmp/speculative-bench.log)
    ids=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ids"])' <<<"$out")
    [[ -z $reference ]] && reference=$ids
    if [[ $ids != "$reference" ]]; then
      echo "prompt $i: $mode gave other tokens than plain decoding" >&2
      exit 1
    fi
    speed=$(sed -n 's/.*generation: .* (\([0-9.]*\) tokens\/s).*/\1/p' /tmp/speculative-bench.log | tail -1)
    kept=$(python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%.2f" % (d["accepted_tokens"] / max(d["drafted_tokens"], 1)) if "drafted_tokens" in d else "-")' <<<"$out")
    n=$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["ids"]))' <<<"$out")
    printf '%-10s %-8s %7s %10s %8s\n' "#$i" "$mode" "$n" "$speed" "$kept"
    total[$mode]=$(python3 -c "print(${total[$mode]:-0} + $speed)")
    read -r d a < <(python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d.get("drafted_tokens", 0), d.get("accepted_tokens", 0))' <<<"$out")
    tokens[$mode]=$((${tokens[$mode]:-0} + n))
    drafted[$mode]=$((${drafted[$mode]:-0} + d))
    kept[$mode]=$((${kept[$mode]:-0} + a))
    if [[ $mode == draft && -n ${LLAMA_SPECULATIVE:-} ]]; then
      "$LLAMA_SPECULATIVE" -m "$MODEL" -md "$DRAFT" -p "$prompt" -n 96 --spec-draft-n-max 8 --temp 0 \
        -t "$THREADS" -td "$THREADS" >/tmp/llama-speculative.log 2>&1
      read -r ln lspeed < <(sed -n 's/.*decoded *\([0-9]*\) tokens in .* speed: *\([0-9.]*\) t\/s.*/\1 \2/p' \
        /tmp/llama-speculative.log | tail -1)
      laccept=$(sed -n 's/.*accept *= *\([0-9.]*\)%.*/\1/p' /tmp/llama-speculative.log | tail -1)
      printf '%-10s %-8s %7s %10s %8s\n' "#$i" llama.cpp "$ln" "$lspeed" "$(python3 -c "print('%.2f' % ($laccept / 100))")"
      total[llama.cpp]=$(python3 -c "print(${total[llama.cpp]:-0} + $lspeed)")
    fi
  done
done
for mode in "${modes[@]}"; do
  python3 -c "print(f'$mode: mean {${total[$mode]}/${#prompts[@]}:.1f} tokens/s, {${total[$mode]}/${total[plain]}:.2f}x plain')"
done
if [[ -n ${total[llama.cpp]:-} ]]; then
  python3 -c "print(f'llama.cpp speculative: mean {${total[llama.cpp]}/${#prompts[@]}:.1f} tokens/s; vicuna draft / llama.cpp = {${total[draft]}/${total[llama.cpp]}:.2f}x')"
fi

if [[ -n ${PROJECT:-} ]]; then
  "$VICUNA" -t "$THREADS" bench --model "$PROJECT" -p 0 -n 16 -r 3 --verify 9 --json >/tmp/speculative-verify.json
  for mode in "${modes[@]}"; do
    python3 - /tmp/speculative-verify.json "$mode" "${tokens[$mode]}" "${drafted[$mode]}" "${kept[$mode]}" <<'PY'
import json, sys
bench = json.load(open(sys.argv[1]))
mode, tokens, drafted, kept = sys.argv[2], *map(int, sys.argv[3:])
seconds = {r["k"]: 1 / r["passes_per_s"] for r in bench["verify"]}
passes = tokens - kept
rows = 1 + drafted / passes
lo = min(int(rows), max(seconds))
hi = min(lo + 1, max(seconds))
t = seconds[lo] + (seconds[hi] - seconds[lo]) * (rows - lo)
per_pass = tokens / passes
print(f"PROJECTION for {bench['model']} ({bench['threads']} threads): {mode}: {per_pass:.2f} tokens a pass, "
      f"{rows:.2f} rows a pass ({1e3 * t:.0f} ms), {per_pass / t:.2f} tokens/s against plain "
      f"{bench['tg_tps']:.2f} (tg16), {per_pass / t / bench['tg_tps']:.2f}x")
PY
  done
  python3 -c "
import json
b = json.load(open('/tmp/speculative-verify.json'))
print('verify pass times (ms by rows k):', ', '.join(f\"{r['k']}: {1e3 / r['passes_per_s']:.0f}\" for r in b['verify']))"
fi
