#!/usr/bin/env python3
"""Makes the reference vectors in this folder with ggml itself (and checks them against gguf-py where it can).

The reference is libggml as shipped, prebuilt, in the npm package `@node-llama-cpp/linux-x64` (version 3.22.1):

    npm pack @node-llama-cpp/linux-x64@3.22.1 && tar xzf node-llama-cpp-linux-x64-3.22.1.tgz
    python3 -m venv venv && venv/bin/pip install gguf==0.19.0 numpy
    venv/bin/python make_reference.py package/bins/linux-x64

From `libggml-base.so` it calls the reference quantizers (`quantize_row_*_ref`, what `llama-quantize` runs without an
importance matrix), the dequantizers (`dequantize_row_*`) and the f16/bf16 row converters; from `libggml-cpu-x64.so`
(built for baseline x86-64: no FMA, so every float operation happens in source order) the scalar dot products
`ggml_vec_dot_*_generic`. Independently, gguf-py's numpy ports must agree byte for byte with every format they
implement (q4_0, q4_1, q5_0, q5_1, q8_0, bf16 quantization; every dequantizer); the script stops if they do not.

Files (all little-endian, no headers):
  weights.f32            ROWS x COLS f32 inputs (row 2 is edge cases: zero blocks, ties, exact halves, tiny values)
  <fmt>.quant.bin        quantize_row_<fmt>_ref(weights), the whole array as one row
  <fmt>.dequant.f32      dequantize_row_<fmt>(<fmt>.quant.bin)
  <fmt>.random.bin       RANDOM_BLOCKS blocks of random bytes (finite f16 scales)
  <fmt>.random.f32       dequantize_row_<fmt>(<fmt>.random.bin)
  f16.bin, bf16.bin      ggml_fp32_to_fp16_row / ggml_fp32_to_bf16_row_ref (weights)
  activations.f32        COLS f32, the right-hand side of the dot products
  act.q8_0.bin           quantize_row_q8_0_ref(activations)
  act.q8_K.bin           quantize_row_q8_K_ref(activations)
  <fmt>.dot.f32          ROWS dot products ggml_vec_dot_<fmt>_q8_{0,K}_generic(row r of <fmt>.quant.bin, act)
"""

import ctypes
import os
import sys

import numpy as np
import gguf
from gguf.constants import GGMLQuantizationType as T

ROWS, COLS = 4, 512
RANDOM_BLOCKS = 4
HERE = os.path.dirname(os.path.abspath(__file__))

FORMATS = {  # name: (gguf-py type, block elements, block bytes, activation type for the dot product or None)
    "q4_0": (T.Q4_0, 32, 18, "q8_0"),
    "q4_1": (T.Q4_1, 32, 20, None),
    "q5_0": (T.Q5_0, 32, 22, None),
    "q5_1": (T.Q5_1, 32, 24, None),
    "q8_0": (T.Q8_0, 32, 34, "q8_0"),
    "q2_K": (T.Q2_K, 256, 84, "q8_K"),
    "q3_K": (T.Q3_K, 256, 110, "q8_K"),
    "q4_K": (T.Q4_K, 256, 144, "q8_K"),
    "q5_K": (T.Q5_K, 256, 176, "q8_K"),
    "q6_K": (T.Q6_K, 256, 210, "q8_K"),
    "q8_K": (T.Q8_K, 256, 292, None),
}
GGUF_PY_QUANTIZES = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
# Byte offsets of the f16 fields of each block: random bytes there are replaced by finite halves.
HALF_FIELDS = {
    "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
    "q2_K": [80, 82], "q3_K": [108], "q4_K": [0, 2], "q5_K": [0, 2], "q6_K": [208],
}


def weights(rng):
    w = np.empty((ROWS, COLS), dtype=np.float32)
    w[0] = rng.normal(0.0, 0.02, COLS)                      # typical weights
    w[1] = rng.standard_t(3, COLS) * 0.5                    # heavy tails
    w[1, rng.integers(0, COLS, 40)] = 0.0                   # scattered exact zeros
    w[3] = rng.uniform(-1.0, 1.0, COLS) + 0.3               # asymmetric: exercises the mins
    e = rng.normal(0.0, 1.0, COLS).astype(np.float32)       # row 2: one edge case per 32-block
    e[0:32] = 0.0                                           # all zero
    e[32:64] = 0.0
    e[40] = -2.5                                            # a single non-zero
    e[64:96] = rng.normal(0, 1, 32)
    e[70], e[90] = 3.0, -3.0                                # |max| tie, opposite signs: the first wins
    e[96:128] = np.concatenate([[127.0], np.arange(31) - 15.5])  # q8_0 scale exactly 1: x.5 ties everywhere
    e[128:160] = 0.5                                        # constant block
    e[160:192] = -np.abs(rng.normal(0, 1, 32))              # all negative
    e[192:224] = rng.normal(0, 1e-20, 32)                   # below GROUP_MAX_EPS for the k-quants' groups
    e[224:256] = rng.normal(0, 1000.0, 32)                  # large
    e[256:288] = np.repeat([1.0, -1.0], 16)                 # two levels
    e[288:320] = rng.normal(0, 1, 32) * 1e-3                # small
    e[320:512] = rng.normal(0, 1, 192)
    w[2] = e
    return w


def random_blocks(rng, name):
    _, _, size, _ = FORMATS[name]
    raw = rng.integers(0, 256, (RANDOM_BLOCKS, size), dtype=np.uint8)
    if name == "q8_K":
        raw[:, 0:4] = np.frombuffer(rng.normal(0, 0.01, RANDOM_BLOCKS).astype(np.float32).tobytes(), np.uint8).reshape(-1, 4)
    for off in HALF_FIELDS.get(name, []):
        halves = rng.normal(0, 0.05, RANDOM_BLOCKS).astype(np.float16)
        raw[:, off:off + 2] = np.frombuffer(halves.tobytes(), np.uint8).reshape(-1, 2)
    return raw


def main():
    libdir = sys.argv[1]
    base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"))
    cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu-x64.so"))
    cpu.ggml_cpu_init()  # fills the f16 → f32 table the baseline build converts scales with
    f32p, voidp, i64 = ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64

    def ptr(a):
        return a.ctypes.data_as(voidp)

    def quantize(name, x):
        _, qk, size, _ = FORMATS[name]
        out = np.zeros(x.size // qk * size, dtype=np.uint8)
        getattr(base, f"quantize_row_{name}_ref")(ptr(x), ptr(out), i64(x.size))
        return out

    def dequantize(name, q):
        _, qk, size, _ = FORMATS[name]
        out = np.zeros(q.size // size * qk, dtype=np.float32)
        getattr(base, f"dequantize_row_{name}")(ptr(q), ptr(out), i64(out.size))
        return out

    def save(fname, a):
        with open(os.path.join(HERE, fname), "wb") as f:
            f.write(np.ascontiguousarray(a).tobytes())

    rng = np.random.default_rng(20240605)
    w = weights(rng)
    x = rng.normal(0, 1, COLS).astype(np.float32)
    x[100:132] = 0.0                                        # an all-zero activation block
    save("weights.f32", w)
    save("activations.f32", x)

    act = {"q8_0": quantize("q8_0", x), "q8_K": quantize("q8_K", x)}
    save("act.q8_0.bin", act["q8_0"])
    save("act.q8_K.bin", act["q8_K"])

    for name, (qtype, qk, size, act_type) in FORMATS.items():
        q = quantize(name, w.ravel())
        dq = dequantize(name, q)
        if name in GGUF_PY_QUANTIZES:
            py = gguf.quantize(w, qtype).ravel()
            assert np.array_equal(py, q), f"{name}: gguf-py quantization differs from ggml"
        if name != "q8_K":  # gguf-py has no q8_K dequantizer
            assert np.array_equal(gguf.dequantize(q, qtype).ravel().view(np.uint32), dq.view(np.uint32)), name
        save(f"{name}.quant.bin", q)
        save(f"{name}.dequant.f32", dq)

        r = random_blocks(rng, name).ravel()
        rdq = dequantize(name, r)
        if name != "q8_K":
            assert np.array_equal(gguf.dequantize(r, qtype).ravel().view(np.uint32), rdq.view(np.uint32)), name
        save(f"{name}.random.bin", r)
        save(f"{name}.random.f32", rdq)

        if act_type is not None:
            dot = getattr(cpu, f"ggml_vec_dot_{name}_{act_type}_generic")
            row_bytes = COLS // qk * size
            s = np.zeros(ROWS, dtype=np.float32)
            for r_i in range(ROWS):
                row = np.ascontiguousarray(q[r_i * row_bytes:(r_i + 1) * row_bytes])
                out = np.zeros(1, dtype=np.float32)
                dot(ctypes.c_int(COLS), ptr(out), ctypes.c_size_t(0), ptr(row), ctypes.c_size_t(0),
                    ptr(act[act_type]), ctypes.c_size_t(0), ctypes.c_int(1))
                s[r_i] = out[0]
            save(f"{name}.dot.f32", s)

    f16 = np.zeros(w.size, dtype=np.uint16)
    base.ggml_fp32_to_fp16_row(ptr(w), ptr(f16), i64(w.size))
    assert np.array_equal(f16, w.ravel().astype(np.float16).view(np.uint16)), "f16"
    save("f16.bin", f16)
    bf16 = np.zeros(w.size, dtype=np.uint16)
    base.ggml_fp32_to_bf16_row_ref(ptr(w), ptr(bf16), i64(w.size))
    assert np.array_equal(bf16, gguf.quantize(w, T.BF16).ravel().view(np.uint16)), "bf16"
    save("bf16.bin", bf16)
    print("reference vectors written to", HERE)


if __name__ == "__main__":
    main()
