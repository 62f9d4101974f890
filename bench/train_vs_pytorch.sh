#!/usr/bin/env bash
# SFT throughput: `vicuna train sft` against the same loop in PyTorch + transformers (when both are
# installed), on the same model folder, data, batch size, sequence lengths, number of steps and
# threads, on the CPU. Full fine-tuning, f32 weights, AdamW, gradient clipping at 1.0.
#
#   bench/train_vs_pytorch.sh [MODEL_DIR] [TOKENIZER_FILE] [STEPS] [BATCH] [THREADS]
#
# Defaults: the tiny 32001-token fixture with the real LLaMA tokenizer, 20 steps of batch 8, every
# core. PYTHON names the interpreter with torch and transformers (default python3); VICUNA a built
# binary (default: a release build of this tree).
# Prints one line per implementation: steps, tokens, seconds, steps/s, tokens/s. Seconds cover the
# training loop only (vicuna's `train_seconds`; the same span in Python), not loading or saving.
# Tokens are the real (unpadded) tokens of every training row: both sides train on the same rows,
# rendered the same way (`### Human: …\n### Assistant: …\n`, BOS and EOS), with the same loss: the
# assistant's tokens and EOS (the prompt's tokens are labelled -100 on PyTorch's side, as vicuna's
# loss mask leaves them out).
# FIRST=pytorch runs PyTorch first (default: vicuna first), to alternate the order between pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/fixtures/models/tiny-v32001/safetensors-f16}
TOKENIZER=${2:-tests/fixtures/tokenizer/tokenizer.model}
STEPS=${3:-20}
BATCH=${4:-8}
THREADS=${5:-$(nproc)}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Synthetic chats, all of one length class, so both sides see the same tokens.
"$PYTHON" - "$WORK/chat.jsonl" "$((STEPS * BATCH))" <<'PY'
import json, sys
things = ["sky", "grass", "sun", "snow", "coal", "rose", "sea", "lemon"]
colors = ["blue", "green", "yellow", "white", "black", "red", "blue", "yellow"]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        k = i % len(things)
        f.write(json.dumps({"prompt": f"What color is the {things[k]}? Answer in one sentence.",
                            "response": f"The {things[k]} is {colors[k]}, as everyone can see."}) + "\n")
PY

if [ -z "${VICUNA:-}" ]; then
  cargo build --release -p vicuna >/dev/null 2>&1
  VICUNA=${CARGO_TARGET_DIR:-target}/release/vicuna
fi

run_vicuna() {
  "$VICUNA" --threads "$THREADS" train sft --model "$MODEL" --tokenizer "$TOKENIZER" --data "$WORK/chat.jsonl" \
    --out "$WORK/out" --epochs 1 --batch-size "$BATCH" --lr 1e-4 --eval-fraction 0 --max-grad-norm 1.0 \
    --max-seq-len 512 2>"$WORK/vicuna.log" >"$WORK/vicuna.json"
  "$PYTHON" - "$WORK/vicuna.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
n, tokens, s = r["steps"], r["train_tokens"], r["train_seconds"]
print(f"vicuna  steps {n} tokens {tokens} seconds {s:.2f} steps/s {n / s:.2f} tokens/s {tokens / s:.0f}")
PY
}

run_pytorch() {
  if ! "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
    echo "pytorch skipped: $PYTHON cannot import torch and transformers"
    return 0
  fi
  "$PYTHON" - "$MODEL" "$TOKENIZER" "$WORK/chat.jsonl" "$BATCH" "$THREADS" <<'PY'
import json, sys, time

import torch
import sentencepiece
from transformers import LlamaForCausalLM
model_dir, tok_file, data, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
# SentencePiece itself: the reference vicuna's tokenizer matches (transformers 5's LlamaTokenizer
# no longer reads a tokenizer.model given alone).
sp = sentencepiece.SentencePieceProcessor(model_file=tok_file)
model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
rows = [json.loads(l) for l in open(data)]


def encode(r):
    """Ids and the index of the first trained token: vicuna's rule (the longest common prefix
    of the ids with those of the prompt part, `### Human: …\\n### Assistant:`)."""
    ids = [sp.bos_id()] + sp.encode(f"### Human: {r['prompt']}\n### Assistant: {r['response']}\n") + [sp.eos_id()]
    prompt = [sp.bos_id()] + sp.encode(f"### Human: {r['prompt']}\n### Assistant:")
    start = 0
    while start < min(len(ids), len(prompt)) and ids[start] == prompt[start]:
        start += 1
    return ids, start


start = time.time()
steps = tokens = 0
for i in range(0, len(rows), batch):
    enc = [encode(r) for r in rows[i:i + batch]]
    width = max(len(e) for e, _ in enc)
    ids = torch.tensor([e + [0] * (width - len(e)) for e, _ in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e, _ in enc])
    labels = torch.tensor([[-100] * k + e[k:] + [-100] * (width - len(e)) for e, k in enc])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    steps += 1
    tokens += sum(len(e) for e, _ in enc)
s = time.time() - start
print(f"pytorch steps {steps} tokens {tokens} seconds {s:.2f} steps/s {steps / s:.2f} tokens/s {tokens / s:.0f}")
PY
}

if [ "${FIRST:-vicuna}" = pytorch ]; then
  run_pytorch
  run_vicuna
else
  run_vicuna
  run_pytorch
fi
