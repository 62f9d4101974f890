#!/usr/bin/env bash
# Multi-turn chat: time to first token as the conversation grows, `vicuna serve` against llama.cpp's `llama-server`
# (-np 1, its default cache_prompt) on the same GGUF file and the same threads. One client; each turn appends a user
# message (30-40 words, fixed text) to the conversation in the StableVicuna template
#   ### Human: {user}\n### Assistant: {reply}\n
# sends the WHOLE conversation, ending in `### Human: {user}\n### Assistant:`, as the prompt of a streamed OpenAI
# `/v1/completions` request (greedy, exactly NEW_TOKENS tokens: EOS cannot end a reply early on either server), and
# appends the reply (stripped, as vicuna's chat template renders it). A server that keeps the previous turn's
# prefix only reads the new tokens; one that does not reads everything again, so its TTFT grows with the turn.
# Prints per turn: prompt tokens (the server's usage; `~` marks an estimate of chars/4 where it sent none), TTFT
# per engine (request sent -> first streamed event with text), the prompt tokens each read from its cache; then vicuna's
# last-turn/first-turn TTFT and vicuna/llama-server at the last turn. All traffic stays on 127.0.0.1.
#
# Usage: bench/multiturn.sh [MODEL]          e.g. VICUNA=target/release/vicuna bench/multiturn.sh 7b
#   MODEL  tiny (default) | 1b | 7b | 13b | a GGUF file with its tokenizer (see bench/serve_common.bash)
# Environment:
#   ENGINES     in this order (default "vicuna llamacpp"); also vicuna-base (`vicuna serve $VICUNA_ARGS_BASELINE`)
#   TURNS       default 8;  NEW_TOKENS  tokens per reply, default 100;  THREADS  default 2
#   WORDS       when N > 0, every reply is made of N whole-word tokens only (`logit_bias` +100 on each, the same
#               for both engines): a random-weight model then writes text that re-encodes to the ids it produced,
#               as a trained model's text does, so the reply is reusable by the next turn (without it, the
#               reply's text re-encodes to other ids from its first token on). The words are the first N pieces
#               `▁[a-z]{3,}` of the LLaMA vocabulary that `vicuna tokenize` encodes back to themselves.
#   VICUNA, VICUNA_ARGS (e.g. a flag that turns a prefix cache off), VICUNA_ARGS_BASELINE, VICUNA_MAX_TOTAL
#   LLAMA_SERVER, LLAMA_ARGS, LLAMA_CTX (llama-server's -c, default 4096)
#   MODEL, TYPE, WORK: see bench/serve_common.bash
# Every engine gets a fresh server, warmed by one short request that shares nothing with the conversation.
# The replies of different engines may differ (their numerics differ), so each engine has its own conversation
# and its own prompt-token counts. Build first: cargo build --release -p vicuna.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${MODEL:-tiny}}
ENGINES=${ENGINES:-vicuna llamacpp}
TURNS=${TURNS:-8}
NEW_TOKENS=${NEW_TOKENS:-100}
LLAMA_NP=1
LLAMA_CTX=${LLAMA_CTX:-4096}
# shellcheck source=bench/serve_common.bash
source bench/serve_common.bash

cat >"$RUN/multiturn.py" <<'PY'
"""One scripted conversation against one server; one JSON line per turn."""
import json, sys
sys.path.insert(0, sys.argv[1])
import client

address, engine, turns, new_tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
# WORDS: {"id": 100} for the whole-word tokens every reply is restricted to (the same for both engines).
bias = json.load(open(sys.argv[6])) if len(sys.argv) > 6 and sys.argv[6] else None

USER = [
    "Hello! I am planning a trip to the mountains of Peru next spring and would like to learn about the animals "
    "I might see there. Could you start by telling me how llamas differ from alpacas?",
    "Thanks. Which of the two is better suited to carrying loads on long hikes, and how much weight can one of "
    "them carry in a day without being harmed or becoming stubborn?",
    "Interesting. I have also read about vicunas and guanacos. Are they wild animals, where exactly do they live, "
    "and is it true that vicuna wool is among the most expensive fibres in the world?",
    "Suppose I wanted to knit a warm scarf from alpaca yarn. How many grams of yarn would I need, which needle "
    "size do you suggest, and how long would a beginner take to finish it?",
    "Back to the trip: what should I pack for high altitude? I am worried about cold nights, strong sunshine and "
    "altitude sickness, and I would like to keep my backpack under twelve kilograms.",
    "Please write a short poem of four lines about a young llama watching the sunrise over a quiet lake, in a "
    "gentle and slightly humorous tone that a child would enjoy hearing at bedtime.",
    "Could you explain, in simple words, why animals that live at high altitude can breathe so easily there, "
    "while visitors like me get headaches and feel tired after climbing a few stairs?",
    "Finally, give me a one day itinerary for Cusco that includes a market, a museum about Andean textiles, a "
    "good place to try local food, and some time to rest in the afternoon.",
    "One more question: how do farmers in the Andes shear their alpacas, how often is it done, and what happens "
    "to the fleece between the farm and the shop where I would buy a sweater?",
    "Last of all, summarise everything we talked about today as a short checklist I can print and keep in my "
    "travel notebook, with the most important points about animals, packing and health.",
]


def user_message(turn):
    text = USER[(turn - 1) % len(USER)]
    return text if turn <= len(USER) else f"(Turn {turn}.) {text}"


conversation = ""
for turn in range(1, turns + 1):
    prompt = conversation + f"### Human: {user_message(turn)}\n### Assistant:"
    extra = {"logit_bias": bias} if bias else {}
    r = client.stream(address, client.body(prompt, new_tokens, **extra))
    if r["ttft"] is None:
        sys.exit(f"{engine} turn {turn}: no generated text in the stream")
    usage, timings = r["usage"] or {}, r["timings"] or {}
    tokens, estimated = usage.get("prompt_tokens"), False
    if tokens is None and "prompt_n" in timings:
        tokens = timings["prompt_n"] + timings.get("cache_n", 0)
    if tokens is None:
        tokens, estimated = len(prompt) // 4, True
    print(json.dumps({
        "engine": engine, "turn": turn, "prompt_tokens": tokens, "estimated": estimated,
        "ttft_ms": round(r["ttft"] * 1000, 1), "total_ms": round(r["total"] * 1000, 1),
        "completion_tokens": usage.get("completion_tokens"), "finish": r["finish"],
        # Prompt tokens the server read from its cache: llama-server's timings, or OpenAI's usage field (vicuna).
        "cache_n": timings.get("cache_n", (usage.get("prompt_tokens_details") or {}).get("cached_tokens")),
        "prompt_n": timings.get("prompt_n"), "prompt_chars": len(prompt),
    }), flush=True)
    print(f"  {engine} turn {turn}: {tokens} prompt tokens, TTFT {r['ttft'] * 1000:.0f} ms, reply {r['total']:.1f} s",
          file=sys.stderr, flush=True)
    conversation = prompt[: -len("### Assistant:")] + f"### Assistant: {r['text'].strip()}\n"
PY

BIAS=
if [ "${WORDS:-0}" -gt 0 ]; then
  BIAS=$RUN/bias.json
  python3 - "$WORDS" "$VICUNA" "$(dirname "$TOKENIZER")" "$BIAS" <<'PY'
import json, re, subprocess, sys
count, vicuna, tokenizer_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
vocab = json.load(open(f"{tokenizer_dir}/tokenizer.json"))["model"]["vocab"]
words = sorted((i, p) for p, i in vocab.items() if re.fullmatch("\u2581[a-z]{3,}", p))
def encode(text):
    args = [vicuna, "tokenize", "--model", tokenizer_dir, "--no-bos", "--json", "--text", text]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)["ids"]
kept = []
for start in range(0, len(words), 500):
    batch = words[start:start + 500]
    # The batch as a reply: " w1 w2 ...". SentencePiece splits at spaces first, so a word keeps its own piece
    # exactly when the batch encodes to the batch's ids; a batch that does not is checked word by word.
    # (SentencePiece's dummy prefix gives the first word its space.)
    if encode(" ".join(p[1:] for _, p in batch)) == [i for i, _ in batch]:
        kept += batch
    else:
        kept += [(i, p) for i, p in batch if encode(p[1:]) == [i]]
    if len(kept) >= count:
        break
kept = kept[:count]
if len(kept) < count:
    sys.exit(f"WORDS={count}: only {len(kept)} whole-word tokens found")
json.dump({str(i): 100 for i, _ in kept}, open(out, "w"))
print(f"replies restricted to {len(kept)} whole-word tokens ({', '.join(p[1:] for _, p in kept[:8])}, ...)")
PY
fi

echo "model: $MODEL ($FILE, $(( $(stat -c %s "$FILE") / 1048576 )) MiB), $THREADS threads per server, $TURNS turns," \
  "$NEW_TOKENS tokens per reply, engines: $ENGINES, $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$RUN/results.jsonl"
for ENGINE in $ENGINES; do
  echo "$ENGINE: $(engine_version "$ENGINE")"
  if [ "$ENGINE" = vicuna ]; then echo "  vicuna serve flags: ${VICUNA_ARGS:-(none)}"; fi
  if [ "$ENGINE" = vicuna-base ]; then echo "  vicuna serve flags: ${VICUNA_ARGS_BASELINE:-(none)}"; fi
  start_server "$ENGINE"
  python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import client; client.warm_up(sys.argv[2])' \
    "$RUN" "$ADDRESS" || { echo "$ENGINE: the warm-up request failed" >&2; tail -20 "$RUN/$ENGINE.log" >&2; exit 1; }
  python3 "$RUN/multiturn.py" "$RUN" "$ADDRESS" "$ENGINE" "$TURNS" "$NEW_TOKENS" "$BIAS" >>"$RUN/results.jsonl" ||
    { echo "$ENGINE: the conversation failed" >&2; tail -20 "$RUN/$ENGINE.log" >&2; exit 1; }
  stop_server
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$RUN/results.jsonl" "$ENGINES" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
engines = sys.argv[2].split()
by = {(r["engine"], r["turn"]): r for r in rows}
turns = sorted({r["turn"] for r in rows})
short = {"vicuna": "vicuna", "vicuna-base": "vic-base", "llamacpp": "llama"}
head = "turn" + "".join(f" {'tok ' + short[e]:>13}" for e in engines) \
    + "".join(f" {'TTFT ' + short[e]:>14}" for e in engines)
head += "".join(f" {'cached ' + short[e]:>14}" for e in engines)
print(head + "   (TTFT in ms)")
for t in turns:
    line = f"{t:>4}"
    for e in engines:
        r = by.get((e, t))
        line += f" {('~' if r and r['estimated'] else '') + str(r['prompt_tokens']) if r else '-':>13}"
    for e in engines:
        r = by.get((e, t))
        line += f" {r['ttft_ms'] if r else float('nan'):>14.1f}"
    for e in engines:
        r = by.get((e, t))
        line += f" {r['cache_n'] if r and r['cache_n'] is not None else '-':>14}"
    print(line)
last, first = turns[-1], turns[0]
for e in engines:
    if e.startswith("vicuna") and (e, last) in by and by[(e, first)]["ttft_ms"]:
        print(f"{e}: TTFT turn {last} / turn {first} = {by[(e, last)]['ttft_ms'] / by[(e, first)]['ttft_ms']:.2f}x")
for e in engines:
    if e.startswith("vicuna") and ("llamacpp", last) in by and (e, last) in by:
        print(f"{e} / llama-server TTFT at turn {last} = "
              f"{by[(e, last)]['ttft_ms'] / by[('llamacpp', last)]['ttft_ms']:.2f}x")
if "llamacpp" in engines and ("llamacpp", last) in by and by[("llamacpp", first)]["ttft_ms"]:
    print(f"llamacpp: TTFT turn {last} / turn {first} = "
          f"{by[('llamacpp', last)]['ttft_ms'] / by[('llamacpp', first)]['ttft_ms']:.2f}x")
bad = [r for r in rows if r["finish"] != "length"]
for r in bad:
    print(f"warning: {r['engine']} turn {r['turn']} finished with {r['finish']!r}, not 'length'")
PY
