"""llama.cpp's side of bench/vs_llamacpp.sh: the figures of `llama-bench` (pp = prompt tokens/s, tg = generated
tokens/s, mean and sd over repetitions), measured through llama-cpp-python, which builds llama.cpp from source.

Like llama-bench: a warm-up (a prompt of up to 32 tokens, one generated token), then REPS runs of each test on a
fresh context; pp evaluates P random tokens in one batch, tg evaluates N tokens one at a time after BOS. Prints one JSON object.
Usage: python llamacpp_bench.py MODEL.gguf -p 512 -n 128 -t THREADS -r REPS
"""

import argparse
import json
import random
import statistics
import time

import llama_cpp
from llama_cpp import Llama


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-t", type=int, default=2)
    parser.add_argument("-r", type=int, default=3)
    args = parser.parse_args()

    llm = Llama(
        model_path=args.model,
        n_ctx=args.p + args.n + 16,
        n_batch=max(args.p, 1),
        n_ubatch=max(args.p, 1),
        n_threads=args.t,
        n_threads_batch=args.t,
        use_mmap=True,
        verbose=False,
    )
    rng = random.Random(0)
    vocab = llm.n_vocab()
    prompt = [rng.randrange(3, vocab) for _ in range(args.p)]

    def prompt_seconds(tokens=prompt):
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - start

    def generation_seconds():
        llm.reset()
        llm.eval([llm.token_bos()])
        start = time.perf_counter()
        for _ in range(args.n):
            llm.eval([rng.randrange(3, vocab)])
        return time.perf_counter() - start

    result = {"engine": "llama.cpp", "version": llama_cpp.__version__, "threads": args.t, "reps": args.r}
    if args.p > 0:
        prompt_seconds(prompt[:32])  # warm-up
        pp = [args.p / prompt_seconds() for _ in range(args.r)]
        result.update(pp_tps=statistics.mean(pp), pp_sd=statistics.stdev(pp) if len(pp) > 1 else 0.0, p=args.p)
    if args.n > 0:
        llm.reset()
        llm.eval([llm.token_bos()] * 2)  # warm-up
        tg = [args.n / generation_seconds() for _ in range(args.r)]
        result.update(tg_tps=statistics.mean(tg), tg_sd=statistics.stdev(tg) if len(tg) > 1 else 0.0, n=args.n)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
