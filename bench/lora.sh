#!/usr/bin/env bash
# What serving LoRA adapters costs `vicuna serve`: 16 clients spread over the base and 4 adapters (client i asks
# for [base, a1, a2, a3, a4][i % 5] by OpenAI's `model`) against 16 clients on the base alone, on the same GGUF
# file with the same threads, each client streaming one /v1/completions request after another for a fixed time
# (greedy, exactly MAX_TOKENS tokens each). Prints aggregate generated tokens/s of both runs and their ratio, which
# issue 15 wants at 0.85 or more. Each run starts a fresh server (the first without --lora, the second with the
# four adapters), warmed by one short request.
#
# The adapters are random (rank $RANK on $TARGETS, B not zero, so their products really run): speed does not
# depend on what they learned. They are written as PEFT folders by a stdlib-only script that reads the model's
# shapes from the GGUF header.
#
# Usage: bench/lora.sh [MODEL] [SECONDS] [MAX_TOKENS]
#   MODEL    1b (default) | tiny | 7b | 13b | a GGUF file that carries its tokenizer (see bench/serve_setup.bash)
#   SECONDS  per run, default 60;  MAX_TOKENS  per request, default 32
# Environment: CLIENTS (16), RANK (8), TARGETS (q_proj,v_proj), THREADS (2), TYPE (q4_0), WORK, VICUNA (release).
# Build first: cargo build --release -p vicuna.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-1b}
SECONDS_PER_RUN=${2:-60}
MAX_TOKENS=${3:-32}
CLIENTS=${CLIENTS:-16}
RANK=${RANK:-8}
TARGETS=${TARGETS:-q_proj,v_proj}
ENGINES=vicuna
# shellcheck source=bench/serve_common.bash
source bench/serve_common.bash

ADAPTERS=$RUN/adapters
python3 - "$FILE" "$ADAPTERS" "$RANK" "$TARGETS" <<'PY'
"""Random PEFT adapters a1..a4 with the GGUF file's shapes (stdlib only)."""
import json, os, random, struct, sys

path, out, rank, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
SIZES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
with open(path, "rb") as f:
    def read(fmt):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]
    def string():
        return f.read(read("Q")).decode("utf-8", "replace")
    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = read("I"), read("Q")
            return [value(inner) for _ in range(n)]
        return read(SIZES[kind])
    assert f.read(4) == b"GGUF", "not a GGUF file"
    read("I"); read("Q")
    meta = {}
    for _ in range(read("Q")):
        key = string()
        meta[key] = value(read("I"))
h, inter, layers = meta["llama.embedding_length"], meta["llama.feed_forward_length"], meta["llama.block_count"]
heads = meta["llama.attention.head_count"]
kv_heads = meta.get("llama.attention.head_count_kv", heads)
head_dim = h // heads
shapes = {"q_proj": (heads * head_dim, h), "k_proj": (kv_heads * head_dim, h), "v_proj": (kv_heads * head_dim, h),
          "o_proj": (h, heads * head_dim), "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
module = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
for a in range(1, 5):
    rng = random.Random(a)
    folder = os.path.join(out, f"a{a}")
    os.makedirs(folder)
    header, data = {}, bytearray()
    for layer in range(layers):
        for t in targets:
            rows, cols = shapes[t]
            stem = f"base_model.model.model.layers.{layer}.{module.get(t, 'mlp')}.{t}"
            for name, shape in (("lora_A", (rank, cols)), ("lora_B", (rows, rank))):
                n = shape[0] * shape[1]
                begin = len(data)
                data += struct.pack(f"<{n}f", *(rng.uniform(-0.01, 0.01) for _ in range(n)))
                header[f"{stem}.{name}.weight"] = {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, len(data)]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(folder, "adapter_model.safetensors.tmp"), "wb") as w:
        w.write(struct.pack("<Q", len(text)) + text + data)
    os.rename(os.path.join(folder, "adapter_model.safetensors.tmp"), os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as w:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}, w)
PY

cat >"$RUN/load.py" <<'PY'
"""CLIENTS threads for SECONDS, client i streaming requests for models[i % len(models)]: aggregate tokens/s."""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import client

address, seconds, max_tokens, clients = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
models = sys.argv[6].split(",")
client.warm_up(address)
deadline = time.perf_counter() + seconds
tokens, errors, requests = [0] * clients, [], [0] * clients

def run(i):
    j = 0
    while time.perf_counter() < deadline:
        prompt = f"### Human: Client {i}, question {j}: tell me about llamas.\n### Assistant:"
        try:
            r = client.stream(address, client.body(prompt, max_tokens, model=models[i % len(models)]))
            tokens[i] += r["usage"]["completion_tokens"] if r["usage"] else r["events"]
            requests[i] += 1
        except Exception as e:  # counted, never hidden
            errors.append(str(e))
        j += 1

start = time.perf_counter()
threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - start
print(json.dumps({"tokens": sum(tokens), "requests": sum(requests), "seconds": elapsed,
                  "tokens_per_s": sum(tokens) / elapsed, "errors": len(errors), "first_error": errors[:1]}))
PY

run() {
  local label=$1 models=$2
  shift 2
  VICUNA_ARGS="$*"
  start_server vicuna
  python3 "$RUN/load.py" "$RUN" "$ADDRESS" "$SECONDS_PER_RUN" "$MAX_TOKENS" "$CLIENTS" "$models" >"$RUN/$label.json"
  stop_server
  echo "$label: $(cat "$RUN/$label.json")"
}

echo "model $FILE, $THREADS threads, $CLIENTS clients, $SECONDS_PER_RUN s per run, $MAX_TOKENS tokens per request"
echo "adapters: rank $RANK on $TARGETS; $("$VICUNA" --version)"
run base "base"
LORAS=()
for a in 1 2 3 4; do LORAS+=(--lora "a$a=$ADAPTERS/a$a"); done
# The base answers to its file's name (the server's --model-id).
BASE_ID=$(basename "$FILE")
run lora "$BASE_ID,a1,a2,a3,a4" --model-id "$BASE_ID" "${LORAS[@]}"
python3 - "$RUN/base.json" "$RUN/lora.json" <<'PY'
import json, sys
base, lora = (json.load(open(p)) for p in sys.argv[1:])
ratio = lora["tokens_per_s"] / base["tokens_per_s"]
print(f"aggregate tokens/s: base alone {base['tokens_per_s']:.2f}, base + 4 adapters {lora['tokens_per_s']:.2f}, "
      f"ratio {ratio:.3f} ({'meets' if ratio >= 0.85 else 'misses'} 0.85); errors {base['errors']} / {lora['errors']}")
PY
