#!/usr/bin/env bash
# Load test of `vicuna serve`: 1, 4, 16 and 64 concurrent clients, each streaming one
# /generate_stream request after another for a fixed time. Prints, per level: requests, aggregate
# generated tokens/s, time to first token (p50/p99), inter-token latency (p50/p99) and errors
# (which must be 0). All traffic stays on 127.0.0.1.
#
# Usage: bench/serve_load.sh [MODEL_DIR|tiny|1b] [SECONDS_PER_LEVEL] [MAX_NEW_TOKENS]
#   MODEL_DIR  a model folder; `tiny` (default) is the test fixture tiny-v32001, `1b` a TinyLlama-1.1B
#              shape with random weights made by `vicuna synth` in a scratch folder
#   SECONDS_PER_LEVEL  default 15
#   MAX_NEW_TOKENS     per request, default 64 (sampled, so EOS may end one earlier)
# Environment: VICUNA = the binary (default: $CARGO_TARGET_DIR or target, release build);
#   LEVELS = the concurrency levels (default "1 4 16 64"); THREADS = --threads for the server.
# Build first: cargo build --release -p vicuna. Needs python3 (standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-tiny}
SECONDS_PER_LEVEL=${2:-15}
MAX_NEW_TOKENS=${3:-64}
LEVELS=${LEVELS:-1 4 16 64}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
TOKENIZER=tests/fixtures/tokenizer/tokenizer.model
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }

WORK=$(mktemp -d /tmp/vicuna-bench-serve.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

case "$MODEL" in
  tiny) MODEL_DIR=tests/fixtures/models/tiny-v32001/safetensors-f16 ;;
  1b)
    MODEL_DIR=$WORK/model-1b
    "$VICUNA" synth --shape 1b --dtype f16 --vocab 32000 --seed 1 --out "$MODEL_DIR" --quiet >/dev/null
    ;;
  *) MODEL_DIR=$MODEL ;;
esac

"$VICUNA" ${THREADS:+--threads "$THREADS"} serve --model "$MODEL_DIR" --tokenizer "$TOKENIZER" --port 0 \
  --max-concurrent-requests 256 --shutdown-grace 1 >"$WORK/stdout" 2>"$WORK/stderr" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  grep -q '^listening on http://' "$WORK/stdout" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/stderr" >&2; exit 1; }
  sleep 0.1
done
ADDRESS=$(sed -n 's|^listening on http://||p' "$WORK/stdout" | head -1)
[ -n "$ADDRESS" ] || { echo "the server did not start" >&2; cat "$WORK/stderr" >&2; exit 1; }

echo "model: $MODEL ($MODEL_DIR), server: $ADDRESS, $SECONDS_PER_LEVEL s per level, max_new_tokens $MAX_NEW_TOKENS, $(nproc) cores"
python3 - "$ADDRESS" "$SECONDS_PER_LEVEL" "$MAX_NEW_TOKENS" $LEVELS <<'PY'
import asyncio, json, sys, time

address, seconds, max_new_tokens = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
levels = [int(x) for x in sys.argv[4:]]
host, port = address.rsplit(":", 1)


async def stream_once(client, n):
    """One streamed request: (time to first token, inter-token gaps, tokens, error or None)."""
    body = json.dumps({
        "inputs": f"### Human: Tell me about llamas, part {client}.{n}\n### Assistant:",
        "parameters": {"do_sample": True, "temperature": 1.0, "seed": client * 100003 + n,
                       "max_new_tokens": max_new_tokens},
    }).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /generate_stream HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        status = (await reader.readline()).split(b" ")[1]
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if status != b"200":
            return None, [], 0, f"HTTP {status.decode()}"
        times, buffer, done = [], b"", False
        while not done:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = json.loads(event[len(b"data:"):])
                if "error" in data:
                    return None, [], len(times), data["error"]
                times.append(time.perf_counter())
                done = data.get("generated_text") is not None
        if not done:
            return None, [], len(times), "stream ended without generated_text"
        return times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times), None
    except Exception as e:  # a failure is counted, not fatal
        return None, [], 0, repr(e)
    finally:
        writer.close()


async def level(concurrency):
    deadline = time.perf_counter() + seconds
    ttfts, itls, errors = [], [], []
    counts = {"requests": 0, "tokens": 0}

    async def client(c):
        n = 0
        while time.perf_counter() < deadline:
            ttft, gaps, tokens, error = await stream_once(c, n)
            n += 1
            counts["requests"] += 1
            counts["tokens"] += tokens
            if error:
                errors.append(error)
            else:
                ttfts.append(ttft)
                itls.extend(gaps)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - start
    return counts, ttfts, itls, errors, elapsed


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9}"
      f" {'ITL p50':>8} {'ITL p99':>8} {'errors':>6}   (times in ms)")
failed = 0
for concurrency in levels:
    counts, ttfts, itls, errors, elapsed = asyncio.run(level(concurrency))
    failed += len(errors)
    print(f"{concurrency:>7} {counts['requests']:>8} {counts['tokens']:>7} {counts['tokens'] / elapsed:>9.1f}"
          f" {pct(ttfts, .5):>9.1f} {pct(ttfts, .99):>9.1f} {pct(itls, .5):>8.1f} {pct(itls, .99):>8.1f}"
          f" {len(errors):>6}", flush=True)
    for error in sorted(set(errors))[:5]:
        print(f"        error: {error}")
sys.exit(1 if failed else 0)
PY
