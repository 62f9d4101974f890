#!/usr/bin/env python3
"""Writes gguf_reference.gguf with the Python `gguf` package (llama.cpp's gguf-py, PyPI `gguf`),
and gguf_reference.json with what a reader must find in it: every metadata value type (nested arrays
included) and f32 / f16 / q8_0 / q4_0 / q4_1 / q5_0 tensors quantized by gguf-py's own numpy
quantizers, with their values dequantized by gguf-py.

    python3 -m venv /tmp/venv-gguf && /tmp/venv-gguf/bin/pip install gguf==0.19.0 numpy
    /tmp/venv-gguf/bin/python crates/weights/tests/data/make_gguf_reference.py

Used by crates/weights/tests/gguf.rs; both outputs are committed (CI has no network).
"""
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gguf_reference.gguf")

rng = np.random.default_rng(20260127)
w = gguf.GGUFWriter(OUT, "llama")
meta = []  # (key, gguf type name, value) in the JSON


def add(key, value, vtype, sub_type=None, name=None):
    w.add_key_value(key, value, vtype, sub_type)
    meta.append({"key": key, "type": name or vtype.name.lower(), "value": value})


add("test.u8", 200, V.UINT8)
add("test.i8", -100, V.INT8)
add("test.u16", 60000, V.UINT16)
add("test.i16", -30000, V.INT16)
add("test.u32", 4000000000, V.UINT32)
add("test.i32", -2000000000, V.INT32)
add("test.f32", 0.25, V.FLOAT32)
add("test.bool_true", True, V.BOOL)
add("test.bool_false", False, V.BOOL)
add("test.string", "héllo ▁wörld", V.STRING)
add("test.empty_string", "", V.STRING)
add("test.u64", 18000000000000000000, V.UINT64)
add("test.i64", -9000000000000000000, V.INT64)
add("test.f64", -1.5e300, V.FLOAT64)
add("test.array_i32", [1, -2, 3], V.ARRAY, V.INT32, name="array")
add("test.array_f32", [0.5, -1.25], V.ARRAY, V.FLOAT32, name="array")
add("test.array_str", ["a", "", "▁b"], V.ARRAY, V.STRING, name="array")
add("test.array_nested", [[1, 2], [3]], V.ARRAY, name="array")
w.add_uint32("llama.block_count", 1)
meta.append({"key": "llama.block_count", "type": "uint32", "value": 1})

tensors = []
for name, qtype, rows, cols in [
    ("t_f32", T.F32, 3, 40),
    ("t_f16", T.F16, 2, 24),
    ("t_q8_0", T.Q8_0, 4, 64),
    ("t_q4_0", T.Q4_0, 4, 64),
    ("t_q4_1", T.Q4_1, 2, 32),
    ("t_q5_0", T.Q5_0, 2, 32),
]:
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == T.F32:
        data = x
    elif qtype == T.F16:
        data = x.astype(np.float16)
    else:
        data = gguf.quants.quantize(x, qtype)
    if qtype in (T.F32, T.F16):
        w.add_tensor(name, data)
        values = data.astype(np.float32)
    else:
        w.add_tensor(name, data, raw_dtype=qtype)
        values = gguf.quants.dequantize(data, qtype)
    tensors.append({
        "name": name,
        "type": qtype.name.lower(),
        "dims": [cols, rows],
        "values": [float(v) for v in values.reshape(-1)],
    })

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

with open(os.path.join(HERE, "gguf_reference.json"), "w") as f:
    json.dump({"gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
               "metadata": meta, "tensors": tensors}, f, ensure_ascii=False, indent=1)
    f.write("\n")
print("wrote", OUT)
