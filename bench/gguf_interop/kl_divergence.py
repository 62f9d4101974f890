"""llama.cpp's side of a KL-divergence comparison: evaluates a model and a reference GGUF with llama.cpp (through
llama-cpp-python) on the chunks `vicuna perplexity` uses (the text tokenized with BOS, cut into chunks of CTX
tokens, each starting with BOS; the second half of each chunk scored) and prints the same figures as
`vicuna perplexity --kl-divergence --json`: perplexity of both, mean KL(reference || model), top-1 agreement.
Usage: python kl_divergence.py MODEL.gguf REFERENCE.gguf TEXT_FILE CTX
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def chunk_log_probs(path, chunks, ctx):
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=1, verbose=False)
    rows = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[: len(chunk)], dtype=np.float64)[ctx // 2 : ctx - 1]
        logits -= logits.max(axis=1, keepdims=True)
        rows.append(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))
    return rows, llm


def main():
    model, reference, text_file, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ref_rows, llm = chunk_log_probs(reference, [], ctx)
    text = open(text_file, encoding="utf-8").read()
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    chunks = [[llm.token_bos()] + tokens[i + 1 : i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]
    ref_rows, _ = chunk_log_probs(reference, chunks, ctx)
    rows, _ = chunk_log_probs(model, chunks, ctx)
    nll, ref_nll, kld, same = [], [], [], []
    for chunk, p, q in zip(chunks, ref_rows, rows):
        targets = np.array(chunk[ctx // 2 + 1 :])
        idx = np.arange(len(targets))
        nll.extend(-q[idx, targets])
        ref_nll.extend(-p[idx, targets])
        kld.extend((np.exp(p) * (p - q)).sum(axis=1))
        same.extend(p.argmax(axis=1) == q.argmax(axis=1))
    print(json.dumps({
        "engine": "llama.cpp",
        "chunks": len(chunks),
        "scored_tokens": len(nll),
        "perplexity": float(np.exp(np.mean(nll))),
        "reference_perplexity": float(np.exp(np.mean(ref_nll))),
        "mean_kld": float(np.mean(kld)),
        "max_kld": float(np.max(kld)),
        "top1_agreement": float(np.mean(same)),
    }))


if __name__ == "__main__":
    main()
