#!/usr/bin/env bash
# The demo chat model, made the way the StableVicuna card made the 13B one: data from Debian's
# wordnet-base, supervised fine-tuning of a fresh LLaMA of the `demo` shape, a reward model on
# preference pairs, PPO with configs/stable_vicuna_ppo.yaml, then the SFT model as the f16 base and
# the PPO model as a delta against it (`vicuna make-delta`), checked with `vicuna apply-delta`.
#
#   models/demo/recipe.sh [WORK]        (default: models/demo/work; run from the repository root)
#
# Each stage writes WORK/<stage>/ and is skipped when that folder is complete, so an interrupted run
# continues where it stopped (delete a folder to redo its stage). Every stage's wall time and peak
# RSS go to WORK/stages.tsv. VICUNA=path picks the binary (default target/release/vicuna, built if
# missing); THREADS (default 2) is the trainer's thread count: the same count gives the same bits.
# Finally the shipped files (models/demo/ship/) are compared with what this run made: SHIP=1
# replaces them instead.
set -euo pipefail

cd "$(dirname "$0")/../.."
WORK=${1:-models/demo/work}
THREADS=${THREADS:-2}
VICUNA=${VICUNA:-target/release/vicuna}
TOKENIZER=tests/fixtures/tokenizer/tokenizer.model
SHIP_DIR=models/demo/ship
mkdir -p "$WORK"
STAGES="$WORK/stages.tsv"

if [[ ! -x $VICUNA ]]; then
    cargo build --release --locked -p vicuna
fi
if [[ ! -f /usr/share/wordnet/data.noun ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "recipe: WordNet is missing; install it with: sudo apt-get install -y wordnet-base" >&2
        exit 2
    fi
    apt-get install -y wordnet-base >&2
fi

# stage NAME OUTPUT_DIR COMMAND...: run COMMAND unless OUTPUT_DIR/.done exists, timing it.
stage() {
    local name=$1 out=$2
    shift 2
    if [[ -f $out/.done ]]; then
        echo "recipe: $name already done ($out)" >&2
        return
    fi
    rm -rf "$out"
    echo "recipe: $name ..." >&2
    local started=$SECONDS rss
    /usr/bin/time -f '%M' -o "$WORK/.rss" "$@" 2>&1 | tee "$WORK/$name.log" >&2
    rss=$(tail -1 "$WORK/.rss")
    mkdir -p "$out"
    touch "$out/.done"
    printf '%s\t%d s\t%.0f MB\n' "$name" $((SECONDS - started)) "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" >>"$STAGES"
}

# 800 words (the ones WordNet's sense-tagged corpus uses most: "house", "run", "time"), 2 % held
# out. A 16M-parameter model learns a definition only after seeing it a few dozen times: 3,000
# words for 6 epochs (40 minutes here) gave fluent answers about the wrong word, so fewer words,
# more epochs. (All of WordNet, 142k words, is ~100× more text than two cores train in an hour.)
stage data "$WORK/data" python3 models/demo/build_data.py --out "$WORK/data" --most-frequent 800

stage init "$WORK/init" "$VICUNA" synth --shape demo --dtype f32 --seed 0 --out "$WORK/init" --force --quiet

# From scratch, so a learning rate of a small pretraining run rather than a fine-tune's 2e-5. Saved
# in f16: the SFT model is the published base, and PPO starts from exactly those weights (as the
# card's PPO started from the f16 Vicuna).
stage sft "$WORK/sft" "$VICUNA" -t "$THREADS" train sft --model "$WORK/init" --tokenizer "$TOKENIZER" \
    --data "$WORK/data/sft_train.jsonl" --out "$WORK/sft" \
    --epochs 15 --batch-size 16 --max-seq-len 128 --lr 1.5e-3 --warmup-steps 100 --weight-decay 0.01 \
    --eval-fraction 0.02 --seed 0 --save-dtype f16

# The reward model starts from the SFT model, as the card's did from its SFT'd Vicuna.
stage rm "$WORK/rm" "$VICUNA" -t "$THREADS" train rm --model "$WORK/sft" --data "$WORK/data/rm_train.jsonl" \
    --out "$WORK/rm" --epochs 4 --batch-size 16 --max-seq-len 128 --lr 1e-4 --warmup-steps 20 \
    --eval-fraction 0.02 --seed 0

# The card's PPO settings (configs/stable_vicuna_ppo.yaml), scaled to this model:
# - max_length 96 / min_length 0 instead of 512 / 48: an answer here is one sentence (~25 tokens);
#   forcing 48 tokens would teach the policy to pad its answers;
# - lr 1e-5 (the card gives none; the config's 1e-6 is for 13B parameters);
# - 24 rollout-and-learn cycles of the card's 128 rollouts instead of trlX's 100 epochs.
stage ppo "$WORK/ppo" "$VICUNA" -t "$THREADS" train ppo --config configs/stable_vicuna_ppo.yaml \
    --model-path "$WORK/sft" --reward-model-path "$WORK/rm" --prompts-path "$WORK/data/ppo_train.jsonl" \
    --checkpoint-dir "$WORK/ppo" --epochs 24 --lr 1e-5 --max-length 96 --min-length 0

# Published like the card: the base (the SFT model, f16) and the delta (PPO − base, f16).
stage delta "$WORK/delta" "$VICUNA" make-delta --base "$WORK/sft" --target "$WORK/ppo/policy" \
    --delta "$WORK/delta" --force --quiet
stage chat "$WORK/chat" "$VICUNA" apply-delta --base "$WORK/sft" --delta "$WORK/delta" --target "$WORK/chat" \
    --force --quiet
# A float16 delta cannot carry every float16 target exactly: measure how far the rebuilt model is
# from the PPO weights rounded to float16 (a few elements by a few of their own tiny steps).
python3 models/demo/same_weights.py "$WORK/chat" "$WORK/ppo/policy" --max-steps 16

stage eval "$WORK/evaluation" python3 models/demo/evaluate.py --work "$WORK" --vicuna "$VICUNA" \
    --out "$WORK/evaluation/eval.json"

# The tests' probe (crates/cli/tests/demo_model.rs): 50 seeded "other definition" pairs of
# training words, and 50 of their definition questions with the taught answer.
python3 - "$WORK/data" "$WORK/probe.jsonl" <<'PY'
import json, random, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/rm_train.jsonl", encoding="utf-8")]
pairs = random.Random(0).sample([r for r in rows if r["rejected_kind"] == "other"], 50)
with open(sys.argv[2] + ".tmp", "w", encoding="utf-8") as f:
    for r in pairs:
        f.write(json.dumps({k: r[k] for k in ("lemma", "prompt", "chosen", "rejected")}) + "\n")
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY

# The shipped files: base/ and delta/ with WordNet's notice. SHIP=1 writes them; otherwise this
# run's files are compared with them, byte for byte.
ship_file() {  # ship_file SRC DEST_RELATIVE
    if [[ ${SHIP:-0} == 1 ]]; then
        mkdir -p "$(dirname "$SHIP_DIR/$2")"
        cp "$1" "$SHIP_DIR/$2.tmp" && mv "$SHIP_DIR/$2.tmp" "$SHIP_DIR/$2"
    elif ! cmp -s "$1" "$SHIP_DIR/$2"; then
        echo "recipe: $SHIP_DIR/$2 differs from this run's $1" >&2
        differ=1
    fi
}
differ=0
for part in sft:base delta:delta; do
    src=$WORK/${part%%:*}
    for file in "$src"/*; do
        ship_file "$file" "${part##*:}/$(basename "$file")"
    done
    ship_file "$WORK/data/LICENSE-WordNet.txt" "${part##*:}/LICENSE-WordNet.txt"
done
ship_file "$WORK/probe.jsonl" probe.jsonl
cat "$STAGES" >&2
if [[ ${SHIP:-0} == 1 ]]; then
    echo "recipe: wrote $SHIP_DIR" >&2
elif [[ $differ == 1 ]]; then
    echo "recipe: this run did not reproduce the shipped files" >&2
    exit 1
else
    echo "recipe: this run reproduced $SHIP_DIR byte for byte" >&2
fi
