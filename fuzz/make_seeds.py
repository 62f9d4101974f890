#!/usr/bin/env python3
"""Writes the starting seeds of the fuzz targets from the repository's fixtures, small: cut-down
copies of tests/fixtures (a tokenizer.model and tokenizer.json of the first 300 pieces, a torch.save
archive and safetensors file of two tiny tensors, a small llama GGUF with a vocabulary) plus the
request bodies the server's tests send. `fuzz/corpus/<target>` holds these after `cargo fuzz cmin`
(and what the campaigns added); rerun only to start over:

    python3 fuzz/make_seeds.py /tmp/seeds && cargo +nightly fuzz cmin <target> /tmp/seeds/<target>
"""
import io
import json
import os
import struct
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "seeds")
KEEP = 300  # pieces kept of LLaMA's 32000 (the byte pieces are ids 3..258)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def fixture(*parts):
    with open(os.path.join(FIX, *parts), "rb") as f:
        return f.read()


# ---- tokenizer.model: protobuf fields kept as they are, pieces (field 1) cut to KEEP.
def varint(b, i):
    v = s = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return v, i


def fields(b):
    i = 0
    while i < len(b):
        start = i
        key, i = varint(b, i)
        wire = key & 7
        if wire == 0:
            _, i = varint(b, i)
        elif wire == 2:
            n, i = varint(b, i)
            i += n
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        yield key >> 3, b[start:i]


model = fixture("tokenizer", "tokenizer.model")
pieces = 0
small = b""
for number, raw in fields(model):
    if number == 1:
        pieces += 1
        if pieces > KEEP:
            continue
    small += raw
put("tokenizer_model", "llama-300.model", small)

# ---- tokenizer.json: the vocabulary below KEEP and the merges within it.
tj = json.loads(fixture("tokenizer", "tokenizer.json"))
vocab = {p: i for p, i in tj["model"]["vocab"].items() if i < KEEP}
merges = []
for m in tj["model"]["merges"]:
    a, b = m.split(" ", 1) if isinstance(m, str) else m
    if a in vocab and b in vocab and a + b in vocab:
        merges.append(m)
tj["model"]["vocab"] = vocab
tj["model"]["merges"] = merges
tj["added_tokens"] = [t for t in tj.get("added_tokens", []) if t["id"] < KEEP]
put("tokenizer_json", "llama-300.json", json.dumps(tj, ensure_ascii=False, separators=(",", ":")))

# ---- config.json: the fixtures' configs.
for rel in ["models/tiny-a/safetensors-f32/config.json", "models/tiny-b/safetensors-f32/config.json",
            "delta/base/config.json"]:
    put("config_json", rel.replace("/", "_"), fixture(*rel.split("/")))

# ---- safetensors: two tiny tensors, metadata, an ignored inv_freq buffer, an empty tensor.
def safetensors(tensors, metadata=None):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
put("safetensors_header", "small.safetensors", safetensors([
    ("model.norm.weight", "F32", [4], f32(1, 2, 3, 4)),
    ("model.embed_tokens.weight", "F16", [2, 2], b"\x00\x3c" * 4),
    ("lm_head.weight", "BF16", [1, 2], b"\x80\x3f" * 2),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "F64", [1], struct.pack("<d", 1.0)),
    ("empty", "F32", [0, 3], b""),
], {"format": "pt"}))
# The header of a real shard, its data cut off (refused as truncated; mutations repair it).
real = fixture("delta", "delta", "model-00002-of-00002.safetensors")
n = struct.unpack("<Q", real[:8])[0]
put("safetensors_header", "delta-shard-header.safetensors", real[:8 + n])

# ---- pickle / torch_zip: a torch.save archive of a contiguous f32 tensor and a transposed f16 view.
def pickle_str(s):
    s = s.encode()
    return b"X" + struct.pack("<I", len(s)) + s


def pickle_int(v):
    return b"J" + struct.pack("<i", v)


def int_tuple(v):
    return b"(" + b"".join(pickle_int(x) for x in v) + b"t"


def tensor(cls, key, numel, offset, shape, stride):
    return (b"ctorch._utils\n_rebuild_tensor_v2\n((" + pickle_str("storage") + b"ctorch\n" + cls.encode() + b"\n"
            + pickle_str(key) + pickle_str("cpu") + pickle_int(numel) + b"tQ" + pickle_int(offset)
            + int_tuple(shape) + int_tuple(stride) + b"\x89ccollections\nOrderedDict\n)RtR")


pkl = (b"\x80\x02}q\x00(" + pickle_str("model.norm.weight") + tensor("FloatStorage", "0", 4, 0, [4], [1]) + b"q\x01"
       + pickle_str("lm_head.weight") + tensor("HalfStorage", "1", 6, 0, [3, 2], [1, 3]) + b"q\x02h\x01"
       + b"u.")
put("pickle", "two-tensors.pkl", pkl)
with zipfile.ZipFile(os.path.join(FIX, "delta", "base", "pytorch_model-00002-of-00002.bin")) as z:
    put("pickle", "delta-base.pkl", z.read([n for n in z.namelist() if n.endswith("data.pkl")][0]))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/data/0", f32(1, 2, 3, 4))
    z.writestr("archive/data/1", b"\x00\x3c" * 6)
    z.writestr("archive/version", "3\n")
put("torch_zip", "two-tensors.bin", buf.getvalue())

# ---- GGUF: a llama GGUF with every metadata value type, a vocabulary of KEEP pieces and two tensors.
def gstr(s):
    s = s.encode()
    return struct.pack("<Q", len(s)) + s


def kv(key, vtype, payload):
    return gstr(key) + struct.pack("<I", vtype) + payload


def arr(etype, items, enc):
    return struct.pack("<IQ", etype, len(items)) + b"".join(enc(x) for x in items)


sp_pieces = []
for number, raw in fields(small):
    if number == 1:
        _, i = varint(raw, 0)
        _, i = varint(raw, i)  # the piece's length: its body follows
        body = raw[i:]
        piece, score, kind = "", 0.0, 1
        for n2, f in fields(body):
            if n2 == 1:
                _, j = varint(f, 0)
                ln, j = varint(f, j)
                piece = f[j:j + ln].decode()
            elif n2 == 2:
                score = struct.unpack("<f", f[1:5])[0]
            elif n2 == 3:
                kind = varint(f, 1)[0]
        sp_pieces.append((piece, score, kind))
meta = [
    kv("general.architecture", 8, gstr("llama")),
    kv("general.alignment", 4, struct.pack("<I", 32)),
    kv("llama.block_count", 4, struct.pack("<I", 1)),
    kv("llama.embedding_length", 4, struct.pack("<I", 8)),
    kv("llama.feed_forward_length", 4, struct.pack("<I", 16)),
    kv("llama.attention.head_count", 4, struct.pack("<I", 2)),
    kv("llama.attention.head_count_kv", 4, struct.pack("<I", 1)),
    kv("llama.context_length", 10, struct.pack("<Q", 64)),
    kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-6)),
    kv("llama.rope.freq_base", 12, struct.pack("<d", 10000.0)),
    kv("llama.rope.scaling.type", 8, gstr("linear")),
    kv("llama.rope.scaling.factor", 6, struct.pack("<f", 2.0)),
    kv("test.i8", 1, struct.pack("<b", -1)),
    kv("test.u16", 2, struct.pack("<H", 7)),
    kv("test.i16", 3, struct.pack("<h", -7)),
    kv("test.i64", 11, struct.pack("<q", -7)),
    kv("test.u8", 0, b"\x07"),
    kv("test.nested", 9, arr(9, [[1, 2], [3]], lambda a: arr(5, a, lambda x: struct.pack("<i", x)))),
    kv("tokenizer.ggml.model", 8, gstr("llama")),
    kv("tokenizer.ggml.tokens", 9, arr(8, [p for p, _, _ in sp_pieces], gstr)),
    kv("tokenizer.ggml.scores", 9, arr(6, [s for _, s, _ in sp_pieces], lambda x: struct.pack("<f", x))),
    kv("tokenizer.ggml.token_type", 9, arr(5, [k for _, _, k in sp_pieces], lambda x: struct.pack("<i", x))),
    kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 1)),
    kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 2)),
    kv("tokenizer.ggml.unknown_token_id", 4, struct.pack("<I", 0)),
    kv("tokenizer.ggml.add_bos_token", 7, b"\x01"),
    kv("tokenizer.ggml.add_space_prefix", 7, b"\x01"),
]
# (name, dims in ggml order, type, bytes): f32 norm, f16 embedding, q8_0 rows of 32.
tensors = [("output_norm.weight", [8], 0, f32(*range(8))),
           ("token_embd.weight", [8, 2], 1, b"\x00\x3c" * 16),
           ("blk.0.attn_q.weight", [32, 1], 8, b"\x00\x3c" + bytes(range(32)))]
infos, data = b"", b""
for name, dims, ty, raw in tensors:
    infos += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    infos += struct.pack("<IQ", ty, len(data))
    data += raw + b"\x00" * (-len(raw) % 32)
head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta) + infos
put("gguf", "llama-300.gguf", head + b"\x00" * (-len(head) % 32) + data)
put("gguf", "gguf_reference.gguf", open(os.path.join(ROOT, "crates/weights/tests/data/gguf_reference.gguf"), "rb").read())
