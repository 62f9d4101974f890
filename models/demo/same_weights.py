#!/usr/bin/env python3
"""Compare two model folders' weights once both are rounded to float16.

    python3 models/demo/same_weights.py REBUILT_DIR ORIGINAL_DIR [--max-steps N]

The recipe uses it to measure how `vicuna apply-delta` of the published base and delta compares
with the PPO trainer's own weights: REBUILT_DIR is apply-delta's float16 output, ORIGINAL_DIR the
PPO policy (float32, rounded to nearest even here as torch's `.half()` does). A float16 delta
cannot always carry a float16 target exactly (where the target is much smaller than the base, the
sum base + delta moves in the base's coarser steps), so a few elements may differ by a step; the
script prints how many, and the largest difference in float16 steps of the original, and exits 1
when the tensor names differ or any element is more than N steps away (default 0: bit for bit).
Reads safetensors files (one or sharded) with the Python standard library.
"""

import json
import math
import os
import struct
import sys
from array import array

SIZES = {"F16": 2, "BF16": 2, "F32": 4}


def tensors(folder):
    """name -> (dtype, raw little-endian bytes) over the model's weight files in `folder`
    (`model*.safetensors`: a PPO policy folder also holds `value_head.safetensors`)."""
    out = {}
    for file in sorted(os.listdir(folder)):
        if not (file.startswith("model") and file.endswith(".safetensors")):
            continue
        with open(os.path.join(folder, file), "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            data = f.read()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SIZES:
                raise SystemExit(f"{folder}/{file}: {name} is {info['dtype']}; only F16, BF16 and F32 are read")
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], data[start:end])
    if not out:
        raise SystemExit(f"{folder} holds no .safetensors file")
    return out


def as_f16_bits(dtype, raw):
    """The tensor as float16 bit patterns (an array of uint16)."""
    if dtype == "F16":
        bits = array("H")
        bits.frombytes(raw)
        return bits
    if dtype == "BF16":
        widened = array("I", (h << 16 for h in array("H", raw)))
        raw = widened.tobytes()
    floats = array("f")
    floats.frombytes(raw)
    bits = array("H")
    bits.frombytes(struct.pack(f"<{len(floats)}e", *floats))
    return bits


def f16_value(bits):
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def main(argv):
    max_steps = 0
    if len(argv) == 5 and argv[3] == "--max-steps":
        max_steps = int(argv[4])
        argv = argv[:3]
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    rebuilt, original = tensors(argv[1]), tensors(argv[2])
    if sorted(rebuilt) != sorted(original):
        missing = sorted(set(original) ^ set(rebuilt))
        print(f"the folders hold different tensors: {missing[:5]}", file=sys.stderr)
        return 1
    differ, total, worst, largest = 0, 0, 0, 0.0
    for name in sorted(rebuilt):
        a, b = as_f16_bits(*rebuilt[name]), as_f16_bits(*original[name])
        if len(a) != len(b):
            print(f"{name}: {len(a)} elements against {len(b)}", file=sys.stderr)
            return 1
        total += len(b)
        for x, y in zip(a, b):
            if x != y:
                differ += 1
                ulp = 2.0 ** (max(math.frexp(f16_value(y))[1], -13) - 11)
                worst = max(worst, abs(f16_value(x) - f16_value(y)) / ulp)
                largest = max(largest, abs(f16_value(x) - f16_value(y)))
    print(f"{len(rebuilt)} tensors, {total} elements: {differ} differ in float16, the largest by "
          f"{worst:.0f} float16 steps of the original ({largest:.3g} in value)", file=sys.stderr)
    return 0 if differ == 0 or worst <= max_steps else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
