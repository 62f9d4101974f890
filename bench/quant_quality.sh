#!/usr/bin/env bash
# Quantization quality on a *trained* model, by vicuna and (optionally) llama.cpp on the same files. Not part of CI.
#
# A random-weight model spreads its probability thinly over 32000 tokens, so its top token leads the next by a
# hair and any rounding reorders them: top-1 agreement says little there. So this runs on a model that has
# learned something, and writes it as f32, q8_0, q4_k_m and q4_0 GGUF files, comparing each with the f32 file
# (chunks of 128 tokens): mean KL divergence, top-1 agreement and perplexity, as `vicuna perplexity
# --kl-divergence` and llama.cpp's llama-perplexity report them. MODEL chooses the model:
#   demo (default)  the shipped demo chat model (models/demo: apply-delta of ship/base + ship/delta), on text it was
#                   taught: the 50 conversations of models/demo/ship/probe.jsonl (question and true definition),
#                   as `### Human: …\n### Assistant: …` turns;
#   tiny            `vicuna synth --shape tiny` (hidden 64, 2 layers, vocab 32000, random) trained by `vicuna train
#                   sft` for 3 epochs on English prose from this repository (bench/quant_quality/corpus.py; ~200
#                   pieces, ~175k tokens, about a minute), on held-out text (tests/fixtures/text/readme_excerpt.txt).
#
# Usage: [MODEL=demo|tiny] bench/quant_quality.sh [WORKDIR]
# Environment: VICUNA = the binary (default: $CARGO_TARGET_DIR or target, release build);
#              PYTHON = a python with llama-cpp-python and numpy, to add llama.cpp's figures (e.g. made with
#                python3 -m venv /tmp/venv-llamacpp && /tmp/venv-llamacpp/bin/pip install llama-cpp-python numpy);
#              THREADS = threads for training (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/vicuna-quant-quality}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/release/vicuna}
PYTHON=${PYTHON:-}
THREADS=${THREADS:-2}
TOKENIZER=tests/fixtures/tokenizer/tokenizer.model
TEXT=tests/fixtures/text/readme_excerpt.txt
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build --release -p vicuna" >&2; exit 1; }
if [ -n "$PYTHON" ]; then
  "$PYTHON" -c "import llama_cpp, numpy" || { echo "$PYTHON lacks llama-cpp-python / numpy" >&2; exit 1; }
fi
rm -rf "$WORK"
mkdir -p "$WORK"

case ${MODEL:-demo} in
  demo)
    "$VICUNA" apply-delta --base models/demo/ship/base --delta models/demo/ship/delta --target "$WORK/trained" \
      --quiet >/dev/null
    TOKENIZER=$WORK/trained/tokenizer.model
    TEXT=$WORK/probe.txt
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print("### Human: " + row["prompt"] + "\n### Assistant: " + row["chosen"])' models/demo/ship/probe.jsonl >"$TEXT"
    echo "the demo chat model (models/demo/ship), on $(wc -l <models/demo/ship/probe.jsonl) taught conversations"
    ;;
  tiny)
    python3 bench/quant_quality/corpus.py . >"$WORK/corpus.jsonl"
    echo "training set: $(wc -l <"$WORK/corpus.jsonl") pieces from $(git rev-parse --short HEAD 2>/dev/null || echo this tree)"
    "$VICUNA" synth --shape tiny --dtype f32 --seed 7 --out "$WORK/base" >/dev/null 2>&1
    "$VICUNA" --threads "$THREADS" train sft --model "$WORK/base" --tokenizer "$TOKENIZER" --data "$WORK/corpus.jsonl" \
      --out "$WORK/trained" --epochs 3 --lr 3e-3 --weight-decay 0.1 --warmup-steps 10 --batch-size 4 --seed 1 \
      2>/dev/null | tail -1
    ;;
  *) echo "MODEL=${MODEL}: demo or tiny" >&2; exit 2 ;;
esac
for ty in f32 q8_0 q4_k_m q4_0; do
  "$VICUNA" quantize --quiet --model "$WORK/trained" --tokenizer "$TOKENIZER" --type $ty --out "$WORK/$ty.gguf" >/dev/null
done

summary() {
  python3 -c 'import json, sys; d = json.load(sys.stdin)
print("%10.3e %7.2f %% %9.2f" % (d["mean_kld"], 100 * d["top1_agreement"], d["perplexity"]), end="")'
}
printf '%-7s | %-30s | %s\n' type "vicuna: KLD, same top-1, PPL" "llama.cpp: KLD, same top-1, PPL"
for ty in q8_0 q4_k_m q4_0; do
  printf '%-7s | ' $ty
  "$VICUNA" perplexity --model "$WORK/$ty.gguf" --file "$TEXT" --ctx 128 --kl-divergence \
    --reference-model "$WORK/f32.gguf" --json 2>/dev/null | summary
  printf ' | '
  if [ -n "$PYTHON" ]; then
    "$PYTHON" bench/gguf_interop/kl_divergence.py "$WORK/$ty.gguf" "$WORK/f32.gguf" "$TEXT" 128 2>/dev/null | summary
  fi
  echo
done
"$VICUNA" perplexity --model "$WORK/f32.gguf" --file "$TEXT" --ctx 128 --json 2>/dev/null |
  python3 -c 'import json, sys; d = json.load(sys.stdin); print("f32 perplexity %.2f over %d tokens" % (d["perplexity"], d["scored_tokens"]))'
