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
# Both sides use the same schedule (vicuna's cosine decay from 1e-4 to 0 over the steps, no warmup) and
# every row is the same conversation, so vicuna's shuffled order and PyTorch's order give the same
# batches: the per-step losses must then agree to f32 rounding, and the last line compares them.
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

# One synthetic chat, repeated: both sides see the same tokens in every batch whatever the order.
"$PYTHON" - "$WORK/chat.jsonl" "$((STEPS * BATCH))" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"prompt": "What color is the sky? Answer in one sentence.",
                            "response": "The sky is blue, as everyone can see on a clear day."}) + "\n")
PY

if [ -z "${VICUNA:-}" ]; then
  cargo build --release -p vicuna >/dev/null 2>&1
  VICUNA=${CARGO_TARGET_DIR:-target}/release/vicuna
fi

run_vicuna() {
  "$VICUNA" --threads "$THREADS" train sft --model "$MODEL" --tokenizer "$TOKENIZER" --data "$WORK/chat.jsonl" \
    --out "$WORK/out" --epochs 1 --batch-size "$BATCH" --lr 1e-4 --eval-fraction 0 --max-grad-norm 1.0 \
    --max-seq-len 512 2>"$WORK/vicuna.log" >"$WORK/vicuna.json"
  sed -n 's/^step [0-9]* epoch [0-9]* loss \([^ ]*\) .*/\1/p' "$WORK/vicuna.log" >"$WORK/vicuna.losses"
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
  "$PYTHON" - "$MODEL" "$TOKENIZER" "$WORK/chat.jsonl" "$BATCH" "$THREADS" "$WORK/pytorch.losses" <<'PY'
import json, math, sys, time

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
total = math.ceil(len(rows) / batch)
# vicuna's schedule: cosine from the base rate to 0 over the run, no warmup (optim::cosine_with_warmup).
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))
losses = []


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
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
    steps += 1
    tokens += sum(len(e) for e, _ in enc)
s = time.time() - start
print(f"pytorch steps {steps} tokens {tokens} seconds {s:.2f} steps/s {steps / s:.2f} tokens/s {tokens / s:.0f}")
open(sys.argv[6], "w").write("".join(f"{l:.6f}\n" for l in losses))
PY
}

# The share of the machine's f32 FMA peak (bench/fma_peak.c, one thread, times THREADS) each side's
# tokens/s stands for, at 6 FLOP per weight of every matrix product per token (forward 2, backward
# 4; the embedding is a lookup), attention's products left out (a few % at these lengths).
report_peak() {
  command -v gcc >/dev/null || { echo "peak    skipped: no gcc to build bench/fma_peak.c"; return 0; }
  gcc -O3 -march=native bench/fma_peak.c -o "$WORK/fma_peak" || return 0
  local peak
  peak=$("$WORK/fma_peak" | awk '/FMA peak/ {print $(NF-1); exit}')
  "$PYTHON" - "$MODEL/config.json" "$peak" "$THREADS" "$WORK/vicuna.out" "$WORK/pytorch.out" <<'PY'
import json, re, sys
c = json.load(open(sys.argv[1]))
peak, threads = float(sys.argv[2]), int(sys.argv[3])
h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
weights = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * c["vocab_size"]
print(f"peak    {peak:.1f} GFLOP/s a thread (bench/fma_peak.c) x {threads}; {6 * weights / 1e6:.0f} MFLOP a token")
for name in sys.argv[4:]:
    try:
        line = open(name).read()
    except OSError:
        continue
    m = re.search(r"^(\w+) .* tokens/s (\d+)", line)
    if m:
        share = int(m.group(2)) * 6 * weights / 1e9 / (peak * threads)
        print(f"peak    {m.group(1)} {100 * share:.0f}% of the FMA peak")
PY
}

compare_losses() {
  [ -s "$WORK/pytorch.losses" ] || return 0
  "$PYTHON" - "$WORK/vicuna.losses" "$WORK/pytorch.losses" <<'PY'
import sys
v = [float(l) for l in open(sys.argv[1])]
p = [float(l) for l in open(sys.argv[2])]
n = min(len(v), len(p))
diff = max(abs(a - b) for a, b in zip(v, p))
print(f"losses  steps {n} vicuna {' '.join(f'{x:.4f}' for x in v[:n])}")
print(f"losses  steps {n} pytorch {' '.join(f'{x:.4f}' for x in p[:n])}")
print(f"losses  max |vicuna - pytorch| {diff:.2e} (vicuna logs 4 decimals)")
PY
}

if [ "${FIRST:-vicuna}" = pytorch ]; then
  run_pytorch | tee "$WORK/pytorch.out"
  run_vicuna | tee "$WORK/vicuna.out"
else
  run_vicuna | tee "$WORK/vicuna.out"
  run_pytorch | tee "$WORK/pytorch.out"
fi
compare_losses
report_peak
