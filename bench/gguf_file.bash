# Sourced (not run) by the serving benchmarks (bench/serve_load.sh, bench/serve_common.bash): sets FILE to the GGUF
# file for MODEL, making it in $WORK when missing and keeping it for the next run:
#   tiny          the fixture tiny-v32001 with the LLaMA tokenizer (`vicuna quantize --type $TYPE`)
#   1b | 7b | 13b random weights of that shape (`vicuna synth --seed 1`) with the LLaMA tokenizer embedded
#   anything else a GGUF file that carries its tokenizer
# Needs MODEL, TYPE, WORK, VICUNA and TOKENIZER set.

mkdir -p "$WORK"
case "$MODEL" in
  tiny)
    FILE=$WORK/tiny-v32001-$TYPE.gguf
    [ -f "$FILE" ] || "$VICUNA" quantize --model tests/fixtures/models/tiny-v32001/safetensors-f16 \
      --tokenizer "$TOKENIZER" --type "$TYPE" --out "$FILE" --quiet >/dev/null
    ;;
  1b | 7b | 13b)
    FILE=$WORK/synth-$MODEL-$TYPE-tok.gguf
    if [ ! -f "$FILE" ]; then
      echo "making $FILE (vicuna synth --shape $MODEL --type $TYPE)" >&2
      # 13b's own vocabulary has 32001 entries (StableVicuna's [PAD]); the tokenizer has 32000.
      "$VICUNA" synth --shape "$MODEL" --vocab 32000 --type "$TYPE" --seed 1 --tokenizer "$TOKENIZER" \
        --out "$FILE" --quiet >/dev/null
    fi
    ;;
  *) FILE=$MODEL ;;
esac
[ -f "$FILE" ] || { echo "no GGUF file at $FILE" >&2; exit 1; }
