"""llama.cpp's greedy continuation of each case's prompt vs transformers' (from the fixture)."""
import json, sys
from llama_cpp import Llama

path, ref = sys.argv[1], json.load(open(sys.argv[2]))
m = Llama(model_path=path, n_ctx=128, n_threads=1, verbose=False)
for case in ref["cases"]:
    m.reset()
    want = case["greedy_new_tokens"]
    got = []
    for t in m.generate(case["input_ids"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == len(want):
            break
    same = sum(a == b for a, b in zip(got, want))
    print(f"{path.rsplit('/', 1)[-1]:>20} {case['name']:>9}: {'SAME' if got == want else 'DIFFERENT'} ({same}/{len(want)} tokens)")
