#!/usr/bin/env python3
"""Measure the demo chat model against the acceptance points of issue 18, through the vicuna CLI.

    python3 models/demo/evaluate.py --work models/demo/work [--vicuna target/release/vicuna]

Reads the recipe's folders (WORK/data, WORK/sft, WORK/rm, WORK/ppo/policy or --policy DIR) and
prints one JSON object (also written to WORK/eval.json):

- knowledge: over seeded random "other gloss" preference pairs (the definition question, the true
  answer, the same sentence around another word's definition), how often the model gives the true
  answer the higher log-probability (`vicuna score`), for training words (200 pairs) and for the
  held-out words (all of theirs); and the perplexity of the held-out SFT answers (answer tokens
  only, each conditioned on its conversation so far).
- reward_model: preference accuracy of the reward model on every held-out pair (`vicuna reward`).
- rlhf: for each held-out PPO prompt, one sampled answer from the SFT model and one from the PPO
  model (temperature 1, no top-k, as PPO samples); the mean reward-model score of each, and
  KL(PPO || SFT) estimated as the mean over the PPO samples of log p_PPO(y|x) - log p_SFT(y|x).

Python 3 standard library only; every number is computed here from the model's outputs.
"""

import argparse
import json
import os
import random
import subprocess
import sys

TEMPLATE_USER = "### Human: "
TEMPLATE_ASSISTANT = "### Assistant:"


class EvalError(Exception):
    pass


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Vicuna:
    def __init__(self, binary):
        self.binary = binary
        self.token_cache = {}

    def run(self, *args):
        proc = subprocess.run([self.binary, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EvalError(f"`vicuna {' '.join(args[:3])} …` failed: {proc.stderr.strip()[-400:]}")
        return json.loads(proc.stdout)

    def ids(self, model, text):
        """Token ids of `text` with BOS (the tokenizer is the same for every model here)."""
        if text not in self.token_cache:
            self.token_cache[text] = self.run("tokenize", "--model", model, "--text", text, "--json")["ids"]
        return self.token_cache[text]

    def logprob_after(self, model, ids, start):
        """Sum of log p(ids[i] | ids[:i]) for i >= start."""
        out = self.run("score", "--model", model, "--ids", ",".join(map(str, ids)), "--json")
        return sum(lp for lp in out["logprobs"][start:] if lp is not None)

    def generate(self, model, prompt, seed, max_new_tokens):
        return self.run("generate", "--model", model, "--prompt", prompt, "--seed", str(seed), "--top-k", "0",
                        "--temperature", "1.0", "--max-new-tokens", str(max_new_tokens), "--json")

    def reward(self, rm, prompt, response):
        return self.run("reward", "--model", rm, "--prompt", prompt, "--response", response, "--json")["score"]


def prompt_text(question):
    return f"{TEMPLATE_USER}{question}\n{TEMPLATE_ASSISTANT}"


def answer_logprob(v, model, question, answer):
    """log p(" answer" | prompt), the answer's tokens only."""
    prompt = prompt_text(question)
    prompt_ids = v.ids(model, prompt)
    full = v.ids(model, f"{prompt} {answer}")
    if full[:len(prompt_ids)] != prompt_ids:
        raise EvalError(f"the prompt's tokens change when the answer follows it: {question!r}")
    return v.logprob_after(model, full, len(prompt_ids))


def knowledge(v, model, pairs):
    wins = 0
    for row in pairs:
        true = answer_logprob(v, model, row["prompt"], row["chosen"])
        other = answer_logprob(v, model, row["prompt"], row["rejected"])
        wins += true > other
    return {"pairs": len(pairs), "true_answer_preferred": wins / len(pairs) if pairs else None}


def heldout_perplexity(v, model, rows):
    """Perplexity of the assistant turns of held-out conversations (each turn given what came before)."""
    total, count = 0.0, 0
    for row in rows:
        text = ""
        for message in row["messages"]:
            if message["role"] == "user":
                text += f"{TEMPLATE_USER}{message['content']}\n{TEMPLATE_ASSISTANT}"
            else:
                prefix = v.ids(model, text)
                full = v.ids(model, f"{text} {message['content']}")
                if full[:len(prefix)] != prefix:
                    raise EvalError(f"tokens of the conversation change at an answer: {row['messages'][0]}")
                total += v.logprob_after(model, full, len(prefix))
                count += len(full) - len(prefix)
                text += f" {message['content']}\n"
    return {"answers_tokens": count, "perplexity": pow(2.718281828459045, -total / count)}


def rm_accuracy(v, rm, pairs):
    right = sum(v.reward(rm, p["prompt"], p["chosen"]) > v.reward(rm, p["prompt"], p["rejected"]) for p in pairs)
    return {"pairs": len(pairs), "accuracy": right / len(pairs)}


def rlhf(v, sft, ppo, rm, prompts, max_new_tokens):
    scores = {"sft": [], "ppo": []}
    kl = []
    samples = []
    for i, row in enumerate(prompts):
        prompt = prompt_text(row["prompt"])
        prompt_ids = v.ids(sft, prompt)
        for name, model in (("sft", sft), ("ppo", ppo)):
            out = v.generate(model, prompt, seed=i, max_new_tokens=max_new_tokens)
            scores[name].append(v.reward(rm, row["prompt"], out["text"].strip()))
            if name == "ppo":
                ids = prompt_ids + out["ids"]
                kl.append(v.logprob_after(ppo, ids, len(prompt_ids)) - v.logprob_after(sft, ids, len(prompt_ids)))
            if i < 5:
                samples.append({"model": name, "prompt": row["prompt"], "answer": out["text"].strip()})
    mean = lambda xs: sum(xs) / len(xs)
    return {"prompts": len(prompts), "mean_reward_sft": mean(scores["sft"]), "mean_reward_ppo": mean(scores["ppo"]),
            "kl_ppo_sft": mean(kl), "samples": samples}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the recipe's work folder")
    parser.add_argument("--vicuna", default="target/release/vicuna")
    parser.add_argument("--policy", help="the PPO model folder (default WORK/ppo/policy)")
    parser.add_argument("--pairs", type=int, default=200, help="training-word pairs to score (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", help="also write the JSON here (default WORK/eval.json)")
    args = parser.parse_args(argv)
    data = os.path.join(args.work, "data")
    sft = os.path.join(args.work, "sft")
    rm = os.path.join(args.work, "rm")
    ppo = args.policy or os.path.join(args.work, "ppo", "policy")
    v = Vicuna(args.vicuna)
    try:
        other_gloss = lambda rows: [r for r in rows if r["rejected_kind"] == "other"]
        train_pairs = other_gloss(read_jsonl(os.path.join(data, "rm_train.jsonl")))
        heldout_pairs_all = read_jsonl(os.path.join(data, "rm_heldout.jsonl"))
        if not train_pairs:
            raise EvalError(f"{data}/rm_train.jsonl has no rows with rejected_kind other")
        sample = random.Random(args.seed).sample(train_pairs, min(args.pairs, len(train_pairs)))
        result = {
            "knowledge": {
                "sft_train_words": knowledge(v, sft, sample),
                "ppo_train_words": knowledge(v, ppo, sample),
                "sft_heldout_words": knowledge(v, sft, other_gloss(heldout_pairs_all)),
                "sft_heldout_answers": heldout_perplexity(v, sft, read_jsonl(os.path.join(data, "sft_heldout.jsonl"))),
            },
            "reward_model": {"heldout": rm_accuracy(v, rm, heldout_pairs_all)},
            "rlhf": rlhf(v, sft, ppo, rm, read_jsonl(os.path.join(data, "ppo_heldout.jsonl")), args.max_new_tokens),
        }
    except (EvalError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    out = args.out or os.path.join(args.work, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
