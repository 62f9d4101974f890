# Sourced (not run) by the serving benchmarks (bench/serve_load.sh, bench/serve_common.bash), after `cd` to the
# repository root. Sets FILE to the GGUF file for MODEL, making it in $WORK when missing and keeping it for the next
# run:
#   tiny          the fixture tiny-v32001 with the LLaMA tokenizer (`vicuna quantize --type $TYPE`)
#   1b | 7b | 13b random weights of that shape (`vicuna synth --seed 1`) with the LLaMA tokenizer embedded
#   anything else a GGUF file that carries its tokenizer
# Needs MODEL, TYPE, WORK, VICUNA and TOKENIZER set. Also makes the run's scratch folder RUN (removed on exit, with
# the server stopped), and defines stop_server (stops SERVER_PID) and free_port.

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

RUN=$(mktemp -d /tmp/vicuna-bench.XXXXXX)
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap 'stop_server; rm -rf "$RUN"' EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
