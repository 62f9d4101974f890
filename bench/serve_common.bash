# Sourced (not run) by bench/multiturn.sh and bench/shared_prefix.sh: defaults, the GGUF file for MODEL and the run
# folder (bench/serve_setup.bash), starting one server at a time, and the stdlib-only streaming client ($RUN/client.py).
#
# Environment (both scripts):
#   MODEL    tiny (default) | 1b | 7b | 13b | a GGUF file that carries its tokenizer; made as bench/serve_load.sh
#            makes them (`vicuna quantize` of the tiny fixture, or `vicuna synth --seed 1` with the LLaMA tokenizer)
#   TYPE     GGUF type made for MODEL (default q4_0);  WORK  where made files are kept (default /tmp/vicuna-bench-gguf)
#   THREADS  compute threads of every server (default 2)
#   VICUNA   the binary (default: $CARGO_TARGET_DIR or target, release build)
#   VICUNA_ARGS           extra flags after `vicuna serve` (default none)
#   VICUNA_ARGS_BASELINE  the flags of the `vicuna-base` engine (default --no-prefix-cache)
#   VICUNA_MAX_TOTAL      vicuna's --max-total-tokens (default 2048, at most the model's context)
#   LLAMA_SERVER  llama.cpp's llama-server (default /work/peer/llama.cpp/build/bin/llama-server)
#   LLAMA_ARGS    extra flags for llama-server (default none)
# Engines: vicuna (`vicuna serve $VICUNA_ARGS`), vicuna-base (`vicuna serve $VICUNA_ARGS_BASELINE`), llamacpp
# (`llama-server -np $LLAMA_NP -c $LLAMA_CTX`, its defaults otherwise: cache_prompt on).

MODEL=${MODEL:-tiny}
TYPE=${TYPE:-q4_0}
WORK=${WORK:-/tmp/vicuna-bench-gguf}
THREADS=${THREADS:-2}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
VICUNA_ARGS=${VICUNA_ARGS-}
VICUNA_ARGS_BASELINE=${VICUNA_ARGS_BASELINE---no-prefix-cache}
VICUNA_MAX_TOTAL=${VICUNA_MAX_TOTAL:-2048}
LLAMA_SERVER=${LLAMA_SERVER:-/work/peer/llama.cpp/build/bin/llama-server}
LLAMA_ARGS=${LLAMA_ARGS-}
TOKENIZER=tests/fixtures/tokenizer/tokenizer.model

command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
if [[ " $ENGINES " == *" llamacpp "* ]] && [ ! -x "$LLAMA_SERVER" ]; then
  cat >&2 <<EOF
no llama-server at $LLAMA_SERVER (set LLAMA_SERVER, or drop llamacpp from ENGINES). To build it:
  python3 -m venv /work/peer/venv && /work/peer/venv/bin/pip install scikit-build-core cmake ninja
  /work/peer/venv/bin/pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /work/peer
  tar xzf /work/peer/llama_cpp_python-0.3.36.tar.gz -C /work/peer
  mv /work/peer/llama_cpp_python-0.3.36/vendor/llama.cpp /work/peer/llama.cpp && cd /work/peer/llama.cpp
  PATH=/work/peer/venv/bin:\$PATH cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON
  PATH=/work/peer/venv/bin:\$PATH cmake --build build --target llama-server llama-bench -j2
EOF
  exit 1
fi

# shellcheck source=bench/serve_setup.bash
source bench/serve_setup.bash

engine_version() {
  case "$1" in
    vicuna | vicuna-base) "$VICUNA" --version ;;
    llamacpp) "$LLAMA_SERVER" --version 2>&1 | grep -m1 -i version || echo unknown ;;
  esac
}

# Starts ENGINE on FILE on 127.0.0.1; sets SERVER_PID and ADDRESS. Ready once it answers (vicuna: once it prints
# its address; llama-server: once /health says 200).
start_server() {
  local engine=$1 log=$RUN/$1.log
  case "$engine" in
    vicuna | vicuna-base)
      local args
      if [ "$engine" = vicuna ]; then args=$VICUNA_ARGS; else args=$VICUNA_ARGS_BASELINE; fi
      # shellcheck disable=SC2086 # the extra flags are split on purpose
      "$VICUNA" --threads "$THREADS" serve --model "$FILE" --host 127.0.0.1 --port 0 \
        --max-total-tokens "$VICUNA_MAX_TOTAL" --max-concurrent-requests 256 --shutdown-grace 1 $args \
        >"$RUN/stdout" 2>"$log" &
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
      # shellcheck disable=SC2086
      "$LLAMA_SERVER" -m "$FILE" --host 127.0.0.1 --port "$port" -t "$THREADS" -tb "$THREADS" -np "$LLAMA_NP" \
        -c "$LLAMA_CTX" --no-webui $LLAMA_ARGS >"$log" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 1 3000); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(f"http://{sys.argv[1]}/health", timeout=5)' \
          "$ADDRESS" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
      done
      ;;
    *) echo "unknown engine $engine (vicuna, vicuna-base or llamacpp)" >&2; exit 1 ;;
  esac
  echo "$engine did not start:" >&2
  tail -20 "$log" >&2
  exit 1
}

cat >"$RUN/client.py" <<'PY'
"""Stdlib-only streaming client for OpenAI /v1/completions, the same request body for vicuna and llama-server."""
import http.client, json, time


def body(prompt, max_tokens, **extra):
    # Greedy, and exactly max_tokens tokens on both servers: vicuna reads min_tokens / ignore_eos, llama-server
    # ignore_eos / n_predict (each ignores the other's fields). cache_prompt is llama-server's default, said anyway.
    b = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "n_predict": max_tokens,
         "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
         "cache_prompt": True}
    b.update(extra)
    return json.dumps(b).encode()


def stream(address, payload, timeout=3600):
    """One streamed request. Returns a dict: ttft (s, request sent -> first event with generated text), total (s),
    text, events (events with text), finish, usage (the server's, if it sent one), timings (llama-server's)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        r = {"ttft": None, "text": "", "events": 0, "finish": None, "usage": None, "timings": None}
        data = []
        while True:
            line = response.readline()
            if not line:
                raise RuntimeError("the stream ended without [DONE]")
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
                continue
            if line or not data:
                continue  # comments (pings), other fields
            event, data = b"\n".join(data), []
            if event == b"[DONE]":
                break
            chunk = json.loads(event)
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:300])
            if chunk.get("usage"):
                r["usage"] = chunk["usage"]
            if chunk.get("timings"):
                r["timings"] = chunk["timings"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if r["ttft"] is None:
                        r["ttft"] = time.perf_counter() - start
                    r["text"] += choice["text"]
                    r["events"] += 1
                if choice.get("finish_reason") is not None:
                    r["finish"] = choice["finish_reason"]
        r["total"] = time.perf_counter() - start
        return r
    finally:
        conn.close()


def warm_up(address):
    """One short request whose prompt shares nothing with the benchmark's but BOS."""
    stream(address, body("Hello, llama", 4))
PY
