"""A random LLaMA folder (f32 safetensors, written by hand) whose rows are whole k-quant blocks:
hidden 256, intermediate 512, 8 layers, 4 heads, 2 key/value heads, vocab 320."""
import json, os, sys
import numpy as np

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
h, inter, layers, heads, kv, vocab = 256, 512, 8, 4, 2, 320
hd = h // heads
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False}
json.dump(config, open(os.path.join(out, "config.json"), "w"))
rng = np.random.default_rng(5)
shapes = [("model.embed_tokens.weight", (vocab, h))]
for i in range(layers):
    p = f"model.layers.{i}"
    shapes += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv * hd, h)),
               (f"{p}.self_attn.v_proj.weight", (kv * hd, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
               (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
               (f"{p}.mlp.down_proj.weight", (h, inter)), (f"{p}.input_layernorm.weight", (h,)),
               (f"{p}.post_attention_layernorm.weight", (h,))]
shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
header, blobs, at = {}, [], 0
for name, shape in shapes:
    if len(shape) == 1:
        x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        x = 0.05 * rng.standard_normal(shape)
    b = x.astype("<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + len(b)]}
    blobs.append(b)
    at += len(b)
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for b in blobs:
        f.write(b)
