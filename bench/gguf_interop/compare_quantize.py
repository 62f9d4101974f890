"""Runs llama.cpp's quantizer (llama_model_quantize) on SRC to TYPE and compares every tensor's type
and bytes, and the tensor order, with vicuna's file OURS."""
import ctypes, os, sys
import llama_cpp
from gguf import GGUFReader

FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}
src, ty, dst, ours = sys.argv[1:5]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = FTYPES[ty]
p.nthread = int(os.environ.get("LLAMA_THREADS", "1"))
if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
    sys.exit(f"llama_model_quantize failed on {src}")
a, b = GGUFReader(dst), GGUFReader(ours)
ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
problems = [f"names differ: {sorted(ta.keys() ^ tb.keys())}"] if ta.keys() != tb.keys() else []
types = {}
for name in ta.keys() & tb.keys():
    x, y = ta[name], tb[name]
    types[x.tensor_type.name] = types.get(x.tensor_type.name, 0) + 1
    if x.tensor_type != y.tensor_type:
        problems.append(f"{name}: llama.cpp {x.tensor_type.name}, vicuna {y.tensor_type.name}")
    elif x.data.tobytes() != y.data.tobytes():
        problems.append(f"{name} ({x.tensor_type.name}): bytes differ")
if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
    problems.append("tensor order differs")
label = f"{src.rsplit('/', 1)[-1]} -> {ty}"
mix = ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
print(f"{label:>32}: {'IDENTICAL' if not problems else 'DIFFERENT'} ({len(ta)} tensors: {mix})")
for line in problems[:10]:
    print("   ", line)
