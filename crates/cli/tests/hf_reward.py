"""Loads a reward model folder with Hugging Face transformers (LlamaForSequenceClassification, one
label) and prints, as JSON, its score of each comma-separated id list given.

Usage: python hf_reward.py RM_DIR 1,2,3 [1,4,5 ...]
Used by crates/cli/tests/train_cli.rs to check that a `vicuna train rm` folder loads in transformers
and scores what `vicuna reward` scores.
"""
import json
import sys

import torch
from transformers import LlamaForSequenceClassification

model = LlamaForSequenceClassification.from_pretrained(sys.argv[1], dtype=torch.float32)
model.eval()
scores = []
with torch.no_grad():
    for arg in sys.argv[2:]:
        ids = [int(i) for i in arg.split(",")]
        scores.append(model(torch.tensor([ids])).logits[0, 0].item())
print(json.dumps({"scores": scores}))
