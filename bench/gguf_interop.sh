#!/usr/bin/env bash
# GGUF interoperability with llama.cpp itself (through llama-cpp-python, which builds llama.cpp
# from source, and gguf-py). Not part of CI. Checks and prints:
#  1. llama.cpp loads the GGUF files `vicuna quantize` writes from the tiny f32 fixture (f32, f16,
#     q8_0) and its greedy tokens equal transformers' (tests/fixtures/models/tiny-a/expected_f32.json);
#  2. llama.cpp's own quantizer (llama_model_quantize), run on vicuna's f32 GGUF, gives the same
#     type and the same bytes for every tensor as `vicuna quantize` for f16, q8_0, q4_0 and q4_k_m —
#     on tiny-a (ragged rows: the fallbacks) and on a model of k-quant-friendly rows (hidden 256,
#     8 layers, grouped-query attention) where the q4_k_m mixture shows;
#  3. vicuna requantizes a GGUF written by llama.cpp (its f16) to the q8_0 llama.cpp makes of it;
#  4. llama.cpp's tokenizer on vicuna's GGUF of tiny-v32001 with the LLaMA tokenizer gives the
#     SentencePiece ids of tests/fixtures/tokenizer/expected_tokenization.json.
#
# Usage: bench/gguf_interop.sh [WORKDIR]
# Environment: VICUNA = the binary (default: $CARGO_TARGET_DIR or target, debug build);
#              PYTHON = a python with llama-cpp-python, gguf and numpy, e.g. made with
#                python3 -m venv /tmp/venv-llamacpp && /tmp/venv-llamacpp/bin/pip install llama-cpp-python gguf numpy
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/vicuna-gguf-interop}
VICUNA=${VICUNA:-${CARGO_TARGET_DIR:-target}/debug/vicuna}
PYTHON=${PYTHON:-/work/venv-llamacpp/bin/python}
[ -x "$VICUNA" ] || { echo "no binary at $VICUNA: run cargo build -p vicuna" >&2; exit 1; }
"$PYTHON" -c "import llama_cpp, gguf, numpy" || { echo "$PYTHON lacks llama-cpp-python / gguf / numpy" >&2; exit 1; }
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

FIX=tests/fixtures
TINY_A=$FIX/models/tiny-a/safetensors-f32
"$PYTHON" bench/gguf_interop/make_kquant_model.py "$WORK/kq"

for model in tiny-a kq; do
  src=$TINY_A; [ $model = kq ] && src=$WORK/kq
  for ty in f32 f16 q8_0 q4_0 q4_k_m; do
    "$VICUNA" quantize --quiet --model "$src" --synthetic-vocab --type $ty --out "$WORK/$model-$ty.gguf" >/dev/null
  done
done

echo "== 1. llama.cpp runs vicuna's GGUF: greedy tokens vs transformers (tiny-a)"
for ty in f32 f16 q8_0; do
  "$PYTHON" bench/gguf_interop/greedy.py "$WORK/tiny-a-$ty.gguf" $FIX/models/tiny-a/expected_f32.json
done

echo "== 2. llama.cpp's quantizer on vicuna's f32 GGUF vs vicuna quantize"
for model in tiny-a kq; do
  for ty in f16 q8_0 q4_0 q4_k_m; do
    "$PYTHON" bench/gguf_interop/compare_quantize.py "$WORK/$model-f32.gguf" $ty "$WORK/ll-$model-$ty.gguf" "$WORK/$model-$ty.gguf"
  done
done

echo "== 3. vicuna requantizes llama.cpp's f16 GGUF"
"$VICUNA" quantize --quiet --model "$WORK/ll-kq-f16.gguf" --type q8_0 --out "$WORK/kq-f16-q8_0.gguf" >/dev/null
"$PYTHON" bench/gguf_interop/compare_quantize.py "$WORK/ll-kq-f16.gguf" q8_0 "$WORK/ll-kq-f16-q8_0.gguf" "$WORK/kq-f16-q8_0.gguf"

echo "== 4. llama.cpp's tokenizer on vicuna's GGUF (LLaMA tokenizer, tiny-v32001)"
"$VICUNA" quantize --quiet --model $FIX/models/tiny-v32001/safetensors-f16 --tokenizer $FIX/tokenizer --type q8_0 \
  --out "$WORK/v32001.gguf" >/dev/null
"$PYTHON" bench/gguf_interop/llama_tokenize.py "$WORK/v32001.gguf" $FIX/tokenizer/expected_tokenization.json
