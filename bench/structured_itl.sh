#!/usr/bin/env bash
# What structured output costs the requests beside it: CLIENTS (default 4) unconstrained streamed `/v1/completions`
# requests (greedy, exactly MAX_TOKENS tokens each, default 64) run together with one more long request, which is
# either unconstrained too ("plain") or constrained by a JSON schema ("schema": an array of exactly 60 integers
# 0..999, sampled, so the grammar's mask is computed at every one of its steps). Both runs have the same batch size,
# so the difference is the grammar's work alone. Prints, per run, the unconstrained requests' mean inter-token
# latency (the time between their first and last streamed token over the tokens between) and the schema run's as a
# multiple of the plain run's; ROUNDS (default 3) alternating rounds of each on one fresh server.
#
# Usage: bench/structured_itl.sh [MODEL]      e.g. VICUNA=target/release/vicuna bench/structured_itl.sh 7b
#   MODEL  tiny (default) | 1b | 7b | 13b | a GGUF file with its tokenizer (see bench/serve_common.bash)
# Environment: CLIENTS, MAX_TOKENS, ROUNDS, THREADS (default 2), VICUNA, VICUNA_ARGS, MODEL, TYPE, WORK.
# Build first: cargo build --release -p vicuna.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${MODEL:-tiny}}
ENGINES=vicuna
CLIENTS=${CLIENTS:-4}
MAX_TOKENS=${MAX_TOKENS:-64}
ROUNDS=${ROUNDS:-3}
# shellcheck source=bench/serve_common.bash
source bench/serve_common.bash

cat >"$RUN/structured_itl.py" <<'PY'
"""One round: CLIENTS plain streams and one long stream, plain or under a JSON schema; one JSON line."""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import client

address, kind, clients, max_tokens = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 60, "maxItems": 60}
# The long request: about as many tokens either way (60 numbers and their commas under the schema).
LONG = 4 * max_tokens


def long_body():
    if kind == "plain":
        return client.body("### Human: Count.\n### Assistant:", LONG)
    b = json.loads(client.body("### Human: Count.\n### Assistant:", LONG))
    for key in ("min_tokens", "n_predict", "ignore_eos"):
        b.pop(key)  # the grammar ends the text
    b.update({"temperature": 1.0, "seed": 7, "response_format": {"type": "json_schema",
              "json_schema": {"name": "numbers", "schema": SCHEMA}}})
    return json.dumps(b).encode()


results = [None] * (clients + 1)
barrier = threading.Barrier(clients + 2)


def worker(i):
    payload = long_body() if i == clients else client.body(f"### Human: Tell me story {i}.\n### Assistant:", max_tokens)
    barrier.wait()  # all at once: the long request, 4x as long, runs from before the plain ones' first token to after their last
    try:
        results[i] = client.stream(address, payload)
    except Exception as e:
        results[i] = {"error": repr(e)[:300]}


threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients + 1)]
for t in threads:
    t.start()
barrier.wait()
for t in threads:
    t.join()
errors = [r["error"] for r in results if "error" in r]
plain = [r for r in results[:clients] if "error" not in r]
itl = [(r["total"] - r["ttft"]) / (r["events"] - 1) * 1000 for r in plain if r["events"] > 1]
long = results[clients]
valid = None
# A random-weight model fills the allowed whitespace (up to 32 characters between tokens), so the reply may still be
# unfinished at max_tokens: then only a finished one can be checked. The mask ran at every step either way.
if kind == "schema" and "error" not in long and long["finish"] == "stop":
    try:
        value = json.loads(long["text"])
        valid = isinstance(value, list) and len(value) == 60 and all(isinstance(v, int) and 0 <= v <= 999 for v in value)
    except ValueError:
        valid = False
print(json.dumps({"kind": kind, "itl_ms": sum(itl) / len(itl) if itl else None, "errors": errors,
                  "long_total_s": long.get("total"), "long_events": long.get("events"), "schema_valid": valid,
                  "long_finish": long.get("finish")}))
PY

echo "model: $MODEL ($FILE, $(( $(stat -c %s "$FILE") / 1048576 )) MiB), $THREADS threads, $CLIENTS plain clients" \
  "x $MAX_TOKENS tokens + 1 long request, $ROUNDS rounds, $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "vicuna: $(engine_version vicuna), serve flags: ${VICUNA_ARGS:-(none)}"
start_server vicuna
python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import client; client.warm_up(sys.argv[2])' "$RUN" "$ADDRESS"
: >"$RUN/results.jsonl"
for _ in $(seq 1 "$ROUNDS"); do
  for kind in plain schema; do
    python3 "$RUN/structured_itl.py" "$RUN" "$ADDRESS" "$kind" "$CLIENTS" "$MAX_TOKENS" >>"$RUN/results.jsonl"
  done
done
stop_server
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$RUN/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
bad = [r for r in rows if r["errors"] or r["schema_valid"] is False or r["itl_ms"] is None]
for r in rows:
    note = f"  finish: {r['long_finish']}" + ("" if r["schema_valid"] is None else f", valid JSON: {r['schema_valid']}")
    print(f"{r['kind']:>6}: plain requests' ITL {r['itl_ms'] or float('nan'):8.2f} ms; long request"
          f" {r['long_events']} events in {r['long_total_s'] or float('nan'):.2f} s{note}")
    for e in r["errors"]:
        print(f"        error: {e}")
itl = {k: statistics.median(r["itl_ms"] for r in rows if r["kind"] == k and r["itl_ms"]) for k in ("plain", "schema")}
print(f"median ITL of the plain requests: beside a plain request {itl['plain']:.2f} ms, beside a schema request"
      f" {itl['schema']:.2f} ms: {itl['schema'] / itl['plain']:.3f}x")
sys.exit(1 if bad else 0)
PY
