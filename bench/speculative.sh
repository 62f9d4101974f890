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
declare -A total
for i in "${!prompts[@]}"; do
  prompt="### Human: ${prompts[$i]}
### Assistant:"
  reference=""
  for mode in "${modes[@]}"; do
    flags=()
    case $mode in
      lookup) flags=(--lookup) ;;
      draft) flags=(--draft-model "$DRAFT") ;;
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
    tokens=$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["ids"]))' <<<"$out")
    printf '%-10s %-8s %7s %10s %8s\n' "#$i" "$mode" "$tokens" "$speed" "$kept"
    total[$mode]=$(python3 -c "print(${total[$mode]:-0} + $speed)")
  done
done
for mode in "${modes[@]}"; do
  python3 -c "print(f'$mode: mean {${total[$mode]}/${#prompts[@]}:.1f} tokens/s, {${total[$mode]}/${total[plain]}:.2f}x plain')"
done
