"""llama.cpp's tokenizer (vocabulary from vicuna's GGUF) on the 33 reference strings."""
import json, sys
from llama_cpp import Llama

m = Llama(model_path=sys.argv[1], n_ctx=64, vocab_only=True, verbose=False)
cases = json.load(open(sys.argv[2]))["cases"]
same = 0
for case in cases:
    got = m.tokenize(case["text"].encode(), add_bos=False, special=False)
    if got == case["ids"]:
        same += 1
    else:
        print(f"    {case['name']}: llama.cpp {got[:12]} expected {case['ids'][:12]}")
print(f"llama.cpp tokenizes {same}/{len(cases)} reference strings like SentencePiece")
