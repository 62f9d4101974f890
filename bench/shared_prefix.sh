#!/usr/bin/env bash
# Shared prefix: CLIENTS concurrent clients (default 16) each send ONE streamed OpenAI `/v1/completions` request at
# the same moment; every prompt is the same ~400-token system prompt (fixed text) followed by a distinct short
# question in the StableVicuna template (`\n### Human: {question}\n### Assistant:`), max_tokens MAX_TOKENS (default
# 16), greedy, forced to exactly that many tokens (EOS cannot end one early). A server that shares the prefix's KV
# cache reads the system prompt once; one that does not reads it CLIENTS times. Prints per engine: prompt tokens
# (the server's usage), TTFT p50 / p90 / max (request sent -> first streamed event with text), the time until the
# last request finished, errors; then vicuna-base's TTFT p50 as a multiple of vicuna's (the cache's gain when
# VICUNA_ARGS turns it on, or VICUNA_ARGS_BASELINE off) and vicuna's against llama-server's. All on 127.0.0.1.
#
# Usage: bench/shared_prefix.sh [MODEL]      e.g. VICUNA=target/release/vicuna bench/shared_prefix.sh 7b
#   MODEL  tiny (default) | 1b | 7b | 13b | a GGUF file with its tokenizer (see bench/serve_common.bash)
# Environment:
#   ENGINES   in this order (default "vicuna llamacpp"). `vicuna` runs two fresh servers: `vicuna serve
#             $VICUNA_ARGS`, then `vicuna serve $VICUNA_ARGS_BASELINE` (reported as vicuna-base; default
#             --no-prefix-cache; BASELINE=0 skips it). llamacpp: `llama-server -np $LLAMA_NP` (default CLIENTS
#             slots, -c LLAMA_CTX default CLIENTS x 768) with its default cache_prompt.
#   CLIENTS   default 16;  MAX_TOKENS  default 16;  THREADS  default 2
#   VICUNA, VICUNA_ARGS, VICUNA_ARGS_BASELINE, VICUNA_MAX_TOTAL, LLAMA_SERVER, LLAMA_ARGS, MODEL, TYPE, WORK:
#             see bench/serve_common.bash
# Every run gets a fresh server, warmed by one short request that shares nothing with the system prompt.
# Build first: cargo build --release -p vicuna.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${MODEL:-tiny}}
ENGINES=${ENGINES:-vicuna llamacpp}
CLIENTS=${CLIENTS:-16}
MAX_TOKENS=${MAX_TOKENS:-16}
BASELINE=${BASELINE:-1}
LLAMA_NP=${LLAMA_NP:-$CLIENTS}
LLAMA_CTX=${LLAMA_CTX:-$(( LLAMA_NP * 768 ))}
# shellcheck source=bench/serve_common.bash
source bench/serve_common.bash

RUNS=
for ENGINE in $ENGINES; do
  RUNS="$RUNS $ENGINE"
  if [ "$ENGINE" = vicuna ] && [ "$BASELINE" != 0 ]; then RUNS="$RUNS vicuna-base"; fi
done

cat >"$RUN/shared_prefix.py" <<'PY'
"""CLIENTS threads, one request each, released together; one JSON line of results."""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import client

address, engine, clients, max_tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

RULES = [
    "You are a patient, friendly and careful assistant who works for a small travel company in the Andes.",
    "Answer every question in plain English, in short paragraphs, and never use more words than the answer needs.",
    "When a question is about animals, say whether you mean llamas, alpacas, vicunas or guanacos, and why.",
    "When a question is about travel, mention the altitude, the season and the time it takes to get there.",
    "If you are not sure about a fact, say so clearly, and suggest where the traveller could check it.",
    "Do not invent prices, opening hours or telephone numbers; tell the traveller to confirm them locally.",
    "Treat the people, customs and languages of the Andes with respect, and avoid jokes about any of them.",
    "When health comes up, remind the traveller to drink water, rest on the first day and see a doctor if unwell.",
    "Recommend local guides, family-run hotels and markets over large chains whenever that is reasonable.",
    "Keep safety first: warn about weather on mountain passes, strong sunshine and cold nights above the clouds.",
    "If asked for a list, give at most seven items, each on its own line, starting with the most important one.",
    "If asked for a poem or a story, keep it gentle, short and suitable for children of any age to hear.",
    "Use metric units first and give miles, feet or pounds in brackets when the traveller seems to be American.",
    "These rules apply to every answer in this conversation, however the question is phrased.",
]
SYSTEM = "A conversation between a traveller and a helpful assistant. The assistant follows these rules.\n" + \
    "\n".join(f"Rule {i}: {rule}" for i, rule in enumerate(RULES, 1))
QUESTIONS = [
    "How tall does an adult llama grow?", "What is the best month to visit Cusco?",
    "Can alpacas live near the sea?", "How do I say thank you in Quechua?",
    "Is vicuna wool softer than cashmere?", "What should I eat on the first day at altitude?",
    "How long is the train to Machu Picchu?", "Do llamas really spit at people?",
    "Which market in Cusco sells textiles?", "How cold is Lake Titicaca at night?",
    "What is a guanaco?", "Should I take coca tea for altitude sickness?",
    "How many alpacas live in Peru?", "What shoes do I need for the Inca Trail?",
    "Can I pet a vicuna in the wild?", "What colour is natural alpaca fleece?",
]


def prompt(i):
    q = QUESTIONS[i % len(QUESTIONS)]
    return f"{SYSTEM}\n### Human: {q if i < len(QUESTIONS) else f'({i}) {q}'}\n### Assistant:"


results = [None] * clients
barrier = threading.Barrier(clients + 1)


def worker(i):
    payload = client.body(prompt(i), max_tokens)
    barrier.wait()
    try:
        results[i] = client.stream(address, payload)
    except Exception as e:  # counted, not fatal
        results[i] = {"error": repr(e)[:300]}


threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
barrier.wait()
start = time.perf_counter()
for t in threads:
    t.join()
wall = time.perf_counter() - start

ok = [r for r in results if "error" not in r and r["ttft"] is not None]
errors = [r.get("error", "no generated text") for r in results if r not in ok]
ttfts = sorted(r["ttft"] * 1000 for r in ok)
pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")
tokens = sorted((r["usage"] or {}).get("prompt_tokens", -1) for r in ok)
print(json.dumps({
    "engine": engine, "clients": clients, "ok": len(ok), "errors": len(errors), "error_samples": sorted(set(errors))[:3],
    "prompt_tokens_min": tokens[0] if tokens else None, "prompt_tokens_max": tokens[-1] if tokens else None,
    "system_chars": len(SYSTEM), "ttft_p50_ms": round(pct(.5), 1), "ttft_p90_ms": round(pct(.9), 1),
    "ttft_max_ms": round(ttfts[-1], 1) if ttfts else None, "wall_ms": round(wall * 1000, 1),
    "not_length": sum(r["finish"] != "length" for r in ok),
    "cache_n": sorted((r["timings"] or {}).get("cache_n", -1) for r in ok) if engine == "llamacpp" else None,
}))
PY

echo "model: $MODEL ($FILE, $(( $(stat -c %s "$FILE") / 1048576 )) MiB), $THREADS threads per server, $CLIENTS clients," \
  "max_tokens $MAX_TOKENS, runs:$RUNS, $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$RUN/results.jsonl"
for ENGINE in $RUNS; do
  echo "$ENGINE: $(engine_version "$ENGINE")"
  if [ "$ENGINE" = vicuna ]; then echo "  vicuna serve flags: ${VICUNA_ARGS:-(none)}"; fi
  if [ "$ENGINE" = vicuna-base ]; then echo "  vicuna serve flags: ${VICUNA_ARGS_BASELINE:-(none)}"; fi
  if [ "$ENGINE" = llamacpp ]; then echo "  llama-server -np $LLAMA_NP -c $LLAMA_CTX ${LLAMA_ARGS}"; fi
  start_server "$ENGINE"
  python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import client; client.warm_up(sys.argv[2])' \
    "$RUN" "$ADDRESS" || { echo "$ENGINE: the warm-up request failed" >&2; tail -20 "$RUN/$ENGINE.log" >&2; exit 1; }
  python3 "$RUN/shared_prefix.py" "$RUN" "$ADDRESS" "$ENGINE" "$CLIENTS" "$MAX_TOKENS" >>"$RUN/results.jsonl"
  stop_server
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$RUN/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'engine':>11} {'clients':>7} {'prompt tok':>11} {'TTFT p50':>9} {'TTFT p90':>9} {'TTFT max':>9}"
      f" {'all done':>9} {'errors':>6}   (times in ms)")
for r in rows:
    tok = f"{r['prompt_tokens_min']}-{r['prompt_tokens_max']}" if r["prompt_tokens_min"] is not None else "-"
    print(f"{r['engine']:>11} {r['clients']:>7} {tok:>11} {r['ttft_p50_ms']:>9.1f} {r['ttft_p90_ms']:>9.1f}"
          f" {r['ttft_max_ms'] or float('nan'):>9.1f} {r['wall_ms']:>9.1f} {r['errors']:>6}")
    if r["cache_n"] is not None:
        print(f"{'':>11} llama-server cached prompt tokens per request: {r['cache_n']}")
    for e in r["error_samples"]:
        print(f"{'':>11} error: {e}")
    if r["not_length"]:
        print(f"{'':>11} warning: {r['not_length']} requests did not finish with 'length'")
p50 = {r["engine"]: r["ttft_p50_ms"] for r in rows}
if "vicuna" in p50 and "vicuna-base" in p50 and p50["vicuna"]:
    print(f"TTFT p50 vicuna-base / vicuna = {p50['vicuna-base'] / p50['vicuna']:.2f}x")
if "vicuna" in p50 and "llamacpp" in p50 and p50["llamacpp"]:
    print(f"TTFT p50 vicuna / llama-server = {p50['vicuna'] / p50['llamacpp']:.2f}x")
sys.exit(1 if any(r["errors"] for r in rows) else 0)
PY
