"""Loads a model folder with Hugging Face transformers and prints, as JSON, the float32 logits of
the last position and the log-probability of every token given its prefix (None for the first).

Usage: python hf_logits.py MODEL_DIR 1,2,3
Used by crates/cli/tests/delta_cli.rs to check that an apply-delta output loads in transformers
and computes what `vicuna score` computes.
"""
import json
import sys

import torch
from transformers import LlamaForCausalLM

model_dir, ids = sys.argv[1], [int(i) for i in sys.argv[2].split(",")]
model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
logprobs = torch.log_softmax(logits, dim=-1)
out = {
    "last_logits": logits[-1].tolist(),
    "logprobs": [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))],
}
print(json.dumps(out))
