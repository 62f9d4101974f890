#!/usr/bin/env bash
# SFT throughput: `vicuna train sft` against the same loop in PyTorch + transformers (when both are
# installed), on the same model folder, data, batch size and number of steps, on the CPU.
#
#   bench/train_vs_pytorch.sh [MODEL_DIR] [TOKENIZER_FILE] [STEPS] [BATCH]
#
# Defaults: the tiny 32001-token fixture with the real LLaMA tokenizer, 20 steps of batch 8.
# Prints one line per implementation: steps, seconds, steps/s, tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/fixtures/models/tiny-v32001/safetensors-f16}
TOKENIZER=${2:-tests/fixtures/tokenizer/tokenizer.model}
STEPS=${3:-20}
BATCH=${4:-8}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Synthetic chats, all of one length class, so both sides see the same tokens.
python3 - "$WORK/chat.jsonl" "$((STEPS * BATCH))" <<'PY'
import json, sys
things = ["sky", "grass", "sun", "snow", "coal", "rose", "sea", "lemon"]
colors = ["blue", "green", "yellow", "white", "black", "red", "blue", "yellow"]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        k = i % len(things)
        f.write(json.dumps({"prompt": f"What color is the {things[k]}? Answer in one sentence.",
                            "response": f"The {things[k]} is {colors[k]}, as everyone can see."}) + "\n")
PY

cargo build --release -p vicuna >/dev/null 2>&1
BIN=${CARGO_TARGET_DIR:-target}/release/vicuna
start=$(date +%s.%N)
"$BIN" train sft --model "$MODEL" --tokenizer "$TOKENIZER" --data "$WORK/chat.jsonl" \
  --out "$WORK/out" --epochs 1 --batch-size "$BATCH" --lr 1e-4 --eval-fraction 0 --max-grad-norm 1.0 \
  2>"$WORK/vicuna.log" >/dev/null
end=$(date +%s.%N)
steps=$(grep -c '^step ' "$WORK/vicuna.log")
python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); n=int(sys.argv[3]); print(f'vicuna  steps {n} seconds {s:.2f} steps/s {n/s:.2f}')" "$start" "$end" "$steps"

if ! python3 -c "import torch, transformers" 2>/dev/null; then
  echo "pytorch skipped: python3 cannot import torch and transformers"
  exit 0
fi
python3 - "$MODEL" "$TOKENIZER" "$WORK/chat.jsonl" "$BATCH" <<'PY'
import json, sys, time
import torch
from transformers import LlamaForCausalLM, LlamaTokenizer
model_dir, tok_file, data, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
tok = LlamaTokenizer(vocab_file=tok_file)
model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
rows = [json.loads(l) for l in open(data)]
texts = [f"### Human: {r['prompt']}\n### Assistant: {r['response']}\n" for r in rows]
start = time.time()
steps = 0
for i in range(0, len(texts), batch):
    enc = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts[i:i + batch]]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    labels = torch.tensor([e + [-100] * (width - len(e)) for e in enc])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    steps += 1
s = time.time() - start
print(f"pytorch steps {steps} seconds {s:.2f} steps/s {steps / s:.2f}")
PY
