#!/usr/bin/env bash
# `vicuna chat` in pipe mode over a scripted conversation: per turn, the prompt tokens, how many came from the
# conversation's KV cache (kept between turns), how many were computed, and the time to the first token (from
# the chat's own `VICUNA_LOG=info` line); then the last turn's first-token time over the first turn's.
#
# Usage: bench/chat_turns.sh MODEL.gguf [TURNS]       e.g. bench/chat_turns.sh /tmp/vicuna-bench-gguf/synth-7b-q4_0-tok.gguf 6
# Environment: VICUNA (default target/release/vicuna), THREADS (default 2), NEW_TOKENS (reply cap, default 100),
#   CHAT_ARGS (more `vicuna chat` flags). Replies are greedy; a reply may end early at EOS or `###`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: bench/chat_turns.sh MODEL.gguf [TURNS]}
TURNS=${2:-6}
VICUNA=${VICUNA:-target/release/vicuna}
THREADS=${THREADS:-2}
NEW_TOKENS=${NEW_TOKENS:-100}
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
USER_TURNS=(
  "Hello! I am planning a trip to the mountains of Peru next spring. How do llamas differ from alpacas?"
  "Which of the two is better suited to carrying loads on long hikes, and how much weight can one carry?"
  "Are vicunas and guanacos wild animals, where do they live, and is vicuna wool really that expensive?"
  "How many grams of alpaca yarn would I need for a warm scarf, and which needle size do you suggest?"
  "What should I pack for high altitude? I worry about cold nights, strong sunshine and altitude sickness."
  "Please write a short poem of four lines about a young llama watching the sunrise over a quiet lake."
  "Why can animals that live at high altitude breathe so easily there, while visitors get headaches?"
  "Finally, give me a one day itinerary for Cusco with a market and a museum about Andean textiles."
)
echo "model: $MODEL, $THREADS threads, $TURNS turns, replies up to $NEW_TOKENS tokens, CPU: $(lscpu | sed -n 's/^Model name: *//p')"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
printf '%s\n' "${USER_TURNS[@]:0:$TURNS}" |
  VICUNA_LOG=info "$VICUNA" --threads "$THREADS" chat --model "$MODEL" --greedy --max-new-tokens "$NEW_TOKENS" \
    ${CHAT_ARGS:-} >/dev/null 2>"$log"
printf '%5s %8s %8s %9s %12s\n' turn prompt cached computed "first (s)"
grep -o 'turn: .*' "$log" | awk '{
  n++; gsub(/[,;]/, ""); first[n] = $14
  printf "%5d %8d %8d %9d %12.3f\n", n, $2, $5, $9, $14
} END { if (n > 1) printf "first token, turn %d / turn 1 = %.2fx\n", n, first[n] / first[1] }'
