#!/usr/bin/env bash
# Load test of `vicuna serve` against llama.cpp's server (llama-cpp-python[server]) on the same GGUF file:
# 1, 4, 16 and 64 concurrent clients, each streaming one OpenAI `/v1/completions` request after another for a
# fixed time. Prints, per level and engine: requests completed, aggregate generated tokens/s, time to first token
# (p50/p99), inter-token latency (p50/p99), requests still waiting for a first token when the time is up, and errors
# (which must be 0); then vicuna's tokens/s as a multiple of llama.cpp's. All traffic stays on 127.0.0.1.
#
# Usage: bench/serve_load.sh [MODEL] [SECONDS_PER_LEVEL] [MAX_TOKENS]
#   MODEL  tiny (default): the fixture tiny-v32001 with the LLaMA tokenizer, as a GGUF (`vicuna quantize`);
#          1b | 7b | 13b: random weights of that shape (`vicuna synth --seed 1`) with the LLaMA tokenizer embedded;
#          or a GGUF file that carries its tokenizer. Made files are kept in $WORK for the next run.
#   SECONDS_PER_LEVEL  default 15; a level may carry its own: LEVELS="1 4 16 64:30"
#   MAX_TOKENS         per request, default 64. Every request generates exactly this many (min_tokens = max_tokens,
#                      so EOS cannot end one early on either server).
# Environment:
#   LEVELS   concurrency levels (default "1 4 16 64"), each optionally LEVEL:SECONDS
#   ENGINES  what to run at each level, in this order (default "vicuna llamacpp"):
#              vicuna     `vicuna serve`, continuous batching (its defaults)
#              vicuna-b1  `vicuna serve --max-batch-size 1`: one sequence at a time, like llama-cpp-python's server
#              llamacpp   `python -m llama_cpp.server`: one llama.cpp context, requests served one after another
#   THREADS  compute threads of both servers (default 2); TYPE  GGUF type made for MODEL (default q4_0)
#   WORK     where made GGUF files are kept (default /tmp/vicuna-bench-gguf)
#   VENV     a venv with llama-cpp-python[server] (default ~/.cache/vicuna-bench/llamacpp-venv; made when missing,
#            which compiles llama.cpp for this CPU: several minutes)
#   VICUNA   the binary (default: $CARGO_TARGET_DIR or target, release build)
# Every level starts a fresh server (so nothing left from the level before runs on), warmed by one short request.
# When the time is up, requests still running are cut off: they count what they had received, not as errors.
# Build first: cargo build --release -p vicuna. The load generator is python3 with the standard library only.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-tiny}
SECONDS_PER_LEVEL=${2:-15}
MAX_TOKENS=${3:-64}
LEVELS=${LEVELS:-1 4 16 64}
ENGINES=${ENGINES:-vicuna llamacpp}
THREADS=${THREADS:-2}
TYPE=${TYPE:-q4_0}
WORK=${WORK:-/tmp/vicuna-bench-gguf}
VENV=${VENV:-$HOME/.cache/vicuna-bench/llamacpp-venv}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
TOKENIZER=tests/fixtures/tokenizer/tokenizer.model
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }

if [[ " $ENGINES " == *" llamacpp "* ]]; then
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "installing llama-cpp-python[server] into $VENV (compiles llama.cpp: several minutes)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install --quiet 'llama-cpp-python[server]'
  elif ! "$VENV/bin/python" -c 'import llama_cpp.server.app' 2>/dev/null; then
    # llama-cpp-python is there without its server extra: add the extra's packages by name, so that pip does not
    # rebuild llama.cpp.
    echo "adding llama-cpp-python's server packages to $VENV" >&2
    "$VENV/bin/pip" install --quiet 'uvicorn>=0.22.0' 'fastapi>=0.100.0' 'pydantic-settings>=2.0.1' \
      'sse-starlette>=1.6.1' 'starlette-context>=0.3.6,<0.4' 'PyYAML>=5.1'
  fi
fi

# shellcheck source=bench/serve_setup.bash
source bench/serve_setup.bash

# Starts ENGINE on FILE; sets SERVER_PID and ADDRESS.
start_server() {
  local engine=$1 log=$RUN/$1.log
  case "$engine" in
    vicuna | vicuna-b1)
      local extra=()
      [ "$engine" = vicuna-b1 ] && extra=(--max-batch-size 1)
      "$VICUNA" --threads "$THREADS" serve --model "$FILE" --port 0 --max-concurrent-requests 256 \
        --shutdown-grace 1 "${extra[@]}" >"$RUN/stdout" 2>"$log" &
      SERVER_PID=$!
      ADDRESS=
      for _ in $(seq 1 3000); do
        ADDRESS=$(sed -n 's|^listening on http://||p' "$RUN/stdout" 2>/dev/null | head -1)
        [ -n "$ADDRESS" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
      done
      ;;
    llamacpp)
      local port
      port=$(free_port)
      ADDRESS=127.0.0.1:$port
      # interrupt_requests False: by default a new request cuts the one streaming short (the server has one
      # context and serves requests one at a time); here they queue instead. No mlock, as vicuna.
      "$VENV/bin/python" -m llama_cpp.server --model "$FILE" --host 127.0.0.1 --port "$port" \
        --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 2048 --n_batch 512 \
        --interrupt_requests False --use_mlock False --verbose False >"$log" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 1 3000); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(f"http://{sys.argv[1]}/v1/models", timeout=5)' \
          "$ADDRESS" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
      done
      ;;
    *) echo "unknown engine $engine (vicuna, vicuna-b1 or llamacpp)" >&2; exit 1 ;;
  esac
  echo "$engine did not start:" >&2
  tail -20 "$log" >&2
  exit 1
}

cat >"$RUN/load.py" <<'PY'
"""Stdlib-only load generator: CLIENTS clients stream /v1/completions requests one after another for SECONDS."""
import asyncio, json, sys, time, urllib.request

address, seconds, clients, max_tokens, engine = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
warmup = len(sys.argv) > 6 and sys.argv[6] == "warmup"
host, port = address.rsplit(":", 1)


class Record:
    def __init__(self):
        self.start = time.perf_counter()
        self.times = []       # arrival of each event that carried generated text
        self.finish = None    # finish_reason of a completed request
        self.error = None


def body(client, n):
    # The request's own numbers come first, so no two prompts share more than BOS: llama-cpp-python reuses the
    # cache of the previous prompt's common prefix, vicuna has no prefix cache.
    prompt = f"{client}.{n}: ### Human: Tell me about llamas, alpacas and vicunas.\n### Assistant:"
    return json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
        "seed": client * 100003 + n,
    }).encode()


async def body_pieces(reader, chunked):
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed inside the chunked body")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def stream_once(record, client, n):
    payload = body(client, n)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()
        status = (await reader.readline()).split(b" ")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if len(status) < 2 or status[1] != b"200":
            record.error = f"HTTP {status[1].decode() if len(status) > 1 else '?'}"
            return
        # Server-sent events: lines ending in \n or \r\n, an empty line ends an event.
        buffer, data = b"", []
        async for piece in body_pieces(reader, chunked):
            buffer += piece
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    data.append(line[5:].strip())
                    continue
                if line or not data:
                    continue  # comments (pings), other fields
                event, data = b"\n".join(data), []
                if event == b"[DONE]":
                    if record.finish is None:
                        record.error = "[DONE] without a finish_reason"
                    return
                chunk = json.loads(event)
                if "error" in chunk or not chunk.get("choices"):
                    if "error" in chunk:
                        record.error = str(chunk["error"])[:200]
                        return
                    continue  # a usage chunk
                choice = chunk["choices"][0]
                if choice.get("text") or choice.get("finish_reason") is None:
                    record.times.append(time.perf_counter())
                if choice.get("finish_reason") is not None:
                    record.finish = choice["finish_reason"]
        record.error = "the stream ended without [DONE]"
    finally:
        writer.close()


async def client_loop(client, records):
    n = 0
    while True:
        record = Record()
        records.append(record)
        try:
            await stream_once(record, client, n)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failure is counted, not fatal
            record.error = repr(e)[:200]
        n += 1
        if warmup:
            return


async def run():
    records = []
    start = time.perf_counter()
    tasks = [asyncio.create_task(client_loop(c, records)) for c in range(clients)]
    await asyncio.wait(tasks, timeout=seconds)
    end = time.perf_counter()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()
    return records, start, end


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def vicuna_metrics():
    """Forward passes so far, their total seconds and tokens generated (vicuna's /metrics)."""
    if not engine.startswith("vicuna"):
        return None
    values = {}
    for line in urllib.request.urlopen(f"http://{address}/metrics", timeout=30).read().decode().splitlines():
        name, _, value = line.partition(" ")
        values[name] = float(value) if value and not line.startswith("#") else 0.0
    return [values.get(k, 0.0) for k in
            ("vicuna_batch_step_seconds_count", "vicuna_batch_step_seconds_sum", "vicuna_generated_tokens_total")]


before = vicuna_metrics()
records, start, end = asyncio.run(run())
after = vicuna_metrics()
elapsed = end - start
errors = [r.error for r in records if r.error]
completed = [r for r in records if r.finish is not None and not r.error]
# A completed request that ran to max_tokens generated exactly max_tokens tokens (an event may carry more than one
# token when a character spans several); cut-off ones count the events they received.
tokens = sum(max_tokens if r.finish == "length" else len(r.times) for r in completed)
tokens += sum(len(r.times) for r in records if r.finish is None and not r.error)
ttfts = [r.times[0] - r.start for r in records if r.times and not r.error]
itls = [b - a for r in records if not r.error for a, b in zip(r.times, r.times[1:])]
waiting = [r for r in records if not r.times and not r.error and r.finish is None]
if warmup:
    sys.exit(1 if errors or not completed else 0)
result = {
    "engine": engine, "clients": clients, "seconds": round(elapsed, 1), "completed": len(completed),
    "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2),
    "ttft_p50_ms": round(pct(ttfts, .5), 1), "ttft_p99_ms": round(pct(ttfts, .99), 1),
    "itl_p50_ms": round(pct(itls, .5), 1), "itl_p99_ms": round(pct(itls, .99), 1),
    "waiting": len(waiting), "errors": len(errors),
    "error_samples": sorted(set(errors))[:5],
}
if before and after:
    # Steps run until the last cut-off request was noticed; enough to see how full the batches were.
    steps, step_s, generated = (b - a for a, b in zip(before, after))
    result.update(steps=int(steps), step_ms=round(1000 * step_s / max(steps, 1), 1),
                  tokens_per_step=round(generated / max(steps, 1), 2))
print(json.dumps(result))
PY

run_level() {
  local engine=$1 clients=$2 seconds=$3
  start_server "$engine"
  python3 "$RUN/load.py" "$ADDRESS" 300 1 4 "$engine" warmup || { echo "$engine: the warm-up request failed" >&2; tail -20 "$RUN/$engine.log" >&2; exit 1; }
  python3 "$RUN/load.py" "$ADDRESS" "$seconds" "$clients" "$MAX_TOKENS" "$engine" >>"$RUN/results.jsonl"
  stop_server
  python3 - "$RUN/results.jsonl" <<'PY'
import json, sys
r = [json.loads(line) for line in open(sys.argv[1])][-1]
print(f"{r['engine']:>9} {r['clients']:>7} {r['seconds']:>5} {r['completed']:>9} {r['tokens']:>7} {r['tokens_per_s']:>9.2f}"
      f" {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}"
      f" {r['waiting']:>7} {r['errors']:>6}", flush=True)
if "steps" in r:
    print(f"          vicuna: {r['steps']} forward passes, {r['step_ms']} ms each on average,"
          f" {r['tokens_per_step']} tokens generated per pass")
for e in r["error_samples"]:
    print(f"          error: {e}")
PY
}

LLAMACPP_VERSION=-
[[ " $ENGINES " == *" llamacpp "* ]] && LLAMACPP_VERSION=$("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')
echo "vicuna: $("$VICUNA" --version); llama-cpp-python: $LLAMACPP_VERSION"
echo "model: $MODEL ($FILE, $(( $(stat -c %s "$FILE") / 1048576 )) MiB), $THREADS threads per server, max_tokens $MAX_TOKENS," \
  "levels: $LEVELS (default $SECONDS_PER_LEVEL s), engines: $ENGINES, $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%9s %7s %5s %9s %7s %9s %9s %9s %8s %8s %7s %6s   (times in ms)\n' engine clients secs completed tokens \
  tokens/s "TTFT p50" "TTFT p99" "ITL p50" "ITL p99" waiting errors
: >"$RUN/results.jsonl"
for LEVEL in $LEVELS; do
  CLIENTS=${LEVEL%%:*}
  SECS=$SECONDS_PER_LEVEL
  [[ "$LEVEL" == *:* ]] && SECS=${LEVEL#*:}
  for ENGINE in $ENGINES; do
    run_level "$ENGINE" "$CLIENTS" "$SECS"
  done
done

python3 - "$RUN/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {r["clients"]: r["tokens_per_s"] for r in rows if r["engine"] == "llamacpp"}
others = [r for r in rows if r["engine"] != "llamacpp" and r["clients"] in base]
if others:
    print("tokens/s as a multiple of llama.cpp's:",
          ", ".join(f"{r['engine']} at {r['clients']}: {r['tokens_per_s'] / base[r['clients']]:.2f}x"
                    if base[r["clients"]] else f"{r['engine']} at {r['clients']}: -" for r in others))
failed = sum(r["errors"] for r in rows)
sys.exit(1 if failed else 0)
PY
