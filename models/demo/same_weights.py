#!/usr/bin/env python3
"""Check that two model folders hold the same weights once both are rounded to float16.

    python3 models/demo/same_weights.py REBUILT_DIR ORIGINAL_DIR

The recipe uses it to show that `vicuna apply-delta` of the published base and delta gives the
PPO model bit for bit: REBUILT_DIR is apply-delta's float16 output, ORIGINAL_DIR the PPO policy
(float32, rounded to nearest even here as torch's `.half()` does). Reads safetensors files (one
or sharded) with the Python standard library; prints the tensors compared and exits 1 naming the
first tensor that differs, with the count of differing elements.
"""

import json
import os
import struct
import sys
from array import array

SIZES = {"F16": 2, "BF16": 2, "F32": 4}


def tensors(folder):
    """name -> (dtype, raw little-endian bytes) over every .safetensors file in `folder`."""
    out = {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".safetensors"):
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


def main(argv):
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    rebuilt, original = tensors(argv[1]), tensors(argv[2])
    if sorted(rebuilt) != sorted(original):
        missing = sorted(set(original) ^ set(rebuilt))
        print(f"the folders hold different tensors: {missing[:5]}", file=sys.stderr)
        return 1
    for name in sorted(rebuilt):
        a, b = as_f16_bits(*rebuilt[name]), as_f16_bits(*original[name])
        if a != b:
            differ = sum(x != y for x, y in zip(a, b)) if len(a) == len(b) else "all"
            print(f"{name}: {differ} of {len(b)} elements differ", file=sys.stderr)
            return 1
    print(f"{len(rebuilt)} tensors identical in float16", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
