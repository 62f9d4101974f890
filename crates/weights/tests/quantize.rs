//! `run_quantize`: GGUF files from the tiny fixtures, checked tensor by tensor against the Hugging
//! Face weights through independent code (the row permutation is re-derived here from
//! `convert_hf_to_gguf.py`'s reshape/swapaxes, not taken from the library).

mod common;

use common::{expect_err, fixture, write_safetensors, TempDir};
use half::f16;
use std::sync::atomic::AtomicBool;
use vicuna_kernels::{dequantize_row, quantize_row, row_size};
use vicuna_weights::{
    run_quantize, tensor_type, Checkpoint, GgmlType, GgufFile, GgufVocab, JobControl, LlamaConfig, Manifest,
    NoProgress, QuantizeRequest, QuantizeTarget,
};

fn quantize(
    model: &std::path::Path,
    target: QuantizeTarget,
    vocab: Option<GgufVocab>,
    out: &std::path::Path,
) -> vicuna_weights::Result<Manifest> {
    let cancel = AtomicBool::new(false);
    let request = QuantizeRequest {
        model: model.to_path_buf(),
        target,
        vocab,
        name: None,
        out: out.to_path_buf(),
        force: false,
        threads: 2,
    };
    run_quantize(&request, &mut JobControl { cancel: &cancel, progress: &mut NoProgress })
}

/// `LlamaModel.permute`: `w.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).reshape(w.shape)`,
/// written as the index map of that numpy expression: output (h, i, j) ← input (h, j, i).
fn reference_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = ((h * half + i) * 2 + j) * cols;
                let src = ((h * 2 + j) * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn hf_name_of(gguf: &str) -> String {
    let map = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    if let Some((_, hf)) = map.iter().find(|(g, _)| *g == gguf) {
        return hf.to_string();
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        other => panic!("unexpected {other}"),
    };
    format!("model.layers.{layer}.{part}")
}

/// The Hugging Face tensor in GGUF row order (q and k permuted), as f32.
fn hf_in_gguf_order(checkpoint: &Checkpoint, config: &LlamaConfig, gguf_name: &str) -> Vec<f32> {
    let hf = hf_name_of(gguf_name);
    let info = checkpoint.info(&hf).unwrap();
    let values = checkpoint.to_f32(&hf).unwrap();
    let (rows, cols) = (info.shape[0], info.shape.get(1).copied().unwrap_or(1));
    if gguf_name.contains("attn_q") {
        reference_permute(&values, rows, cols, config.num_attention_heads)
    } else if gguf_name.contains("attn_k") {
        reference_permute(&values, rows, cols, config.num_key_value_heads)
    } else {
        values
    }
}

fn dequantize(t: &vicuna_weights::GgufTensor) -> Vec<f32> {
    let row_bytes = row_size(t.ty, t.row_len()).unwrap();
    let mut out = vec![0f32; t.numel()];
    for (src, dst) in t.data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(t.row_len())) {
        dequantize_row(t.ty, src, dst).unwrap();
    }
    out
}

const TINY_A: &str = "models/tiny-a/safetensors-f32";

#[test]
fn f32_gguf_holds_the_hf_weights_exactly() {
    let dir = TempDir::new("quant-f32");
    let out = dir.join("tiny.gguf");
    let model = fixture(TINY_A);
    let manifest = quantize(&model, QuantizeTarget::F32, Some(GgufVocab::synthetic(512).unwrap()), &out).unwrap();
    assert_eq!(manifest.files.len(), 1);
    assert_eq!(manifest.files[0].bytes, std::fs::metadata(&out).unwrap().len());
    // Nothing else is left beside the output.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let config = LlamaConfig::from_dir(&model).unwrap();
    let checkpoint = Checkpoint::open(&model).unwrap();
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.tensors().len(), 3 + 9 * config.num_hidden_layers);
    // llama-quantize's order: outside blocks first, then by layer, by name within a layer.
    let names: Vec<&str> = file.tensors().map(|t| t.name).take(5).collect();
    assert_eq!(
        names,
        ["output.weight", "output_norm.weight", "token_embd.weight", "blk.0.attn_k.weight", "blk.0.attn_norm.weight"]
    );
    for t in file.tensors() {
        assert_eq!(t.ty, GgmlType::F32, "{}", t.name);
        let hf = checkpoint.info(&hf_name_of(t.name)).unwrap();
        let reversed: Vec<usize> = hf.shape.iter().rev().copied().collect();
        assert_eq!(t.dims, reversed, "{}", t.name);
        assert_eq!(dequantize(&t), hf_in_gguf_order(&checkpoint, &config, t.name), "{}", t.name);
    }
    // The hyper-parameters read back equal the folder's.
    let back = file.llama_config().unwrap();
    for (a, b) in [
        (back.hidden_size, config.hidden_size),
        (back.intermediate_size, config.intermediate_size),
        (back.num_hidden_layers, config.num_hidden_layers),
        (back.num_attention_heads, config.num_attention_heads),
        (back.num_key_value_heads, config.num_key_value_heads),
        (back.vocab_size, config.vocab_size),
        (back.head_dim, config.head_dim),
    ] {
        assert_eq!(a, b);
    }
    assert_eq!(back.rms_norm_eps as f32, config.rms_norm_eps as f32);
    assert_eq!(back.rope_theta, config.rope_theta);
    assert_eq!(file.get_u32("general.file_type").unwrap(), Some(0));
    assert_eq!(file.get_u32("general.quantization_version").unwrap(), Some(2));
    assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    assert_eq!(file.vocab().unwrap(), GgufVocab::synthetic(512).unwrap());

    // The f32 GGUF requantizes (GGUF → GGUF) to the same q8_0 as the folder does.
    let from_gguf = dir.join("from-gguf.gguf");
    let from_folder = dir.join("from-folder.gguf");
    quantize(&out, QuantizeTarget::Q8_0, None, &from_gguf).unwrap();
    quantize(&model, QuantizeTarget::Q8_0, Some(GgufVocab::synthetic(512).unwrap()), &from_folder).unwrap();
    let (a, b) = (GgufFile::open(&from_gguf).unwrap(), GgufFile::open(&from_folder).unwrap());
    for (x, y) in a.tensors().zip(b.tensors()) {
        assert_eq!((x.name, x.ty, &x.dims, x.data), (y.name, y.ty, &y.dims, y.data));
    }
    // ... and a quantized GGUF is not requantized.
    expect_err(
        quantize(&from_gguf, QuantizeTarget::Q4_0, None, &dir.join("again.gguf")),
        &["already quantized", "q8_0"],
    );
}

#[test]
fn q8_0_and_q4_0_tensors_are_quantize_row_of_the_permuted_rows() {
    let dir = TempDir::new("quant-q");
    let model = fixture(TINY_A);
    let config = LlamaConfig::from_dir(&model).unwrap();
    let checkpoint = Checkpoint::open(&model).unwrap();
    for (target, ty) in [(QuantizeTarget::Q8_0, GgmlType::Q8_0), (QuantizeTarget::Q4_0, GgmlType::Q4_0)] {
        let out = dir.join(&format!("{}.gguf", target.name()));
        quantize(&model, target, Some(GgufVocab::synthetic(512).unwrap()), &out).unwrap();
        let file = GgufFile::open(&out).unwrap();
        assert_eq!(file.get_u32("general.file_type").unwrap(), Some(target.file_type()));
        for t in file.tensors() {
            let want_ty = if t.dims.len() == 1 {
                GgmlType::F32
            } else if t.row_len() % 32 != 0 {
                // ffn_down's rows are 172 long: no whole q4_0/q8_0 blocks, f16 instead.
                GgmlType::F16
            } else if t.name == "output.weight" && ty == GgmlType::Q4_0 {
                // llama.cpp gives the output q6_K, unless its rows are not whole 256-blocks: q8_0.
                GgmlType::Q8_0
            } else {
                ty
            };
            assert_eq!(t.ty, want_ty, "{}", t.name);
            let values = hf_in_gguf_order(&checkpoint, &config, t.name);
            let mut want = vec![0u8; t.data.len()];
            let row_bytes = row_size(t.ty, t.row_len()).unwrap();
            for (src, dst) in values.chunks_exact(t.row_len()).zip(want.chunks_exact_mut(row_bytes)) {
                quantize_row(t.ty, src, dst).unwrap();
            }
            assert_eq!(t.data, want.as_slice(), "{} ({})", t.name, t.ty);
            if t.ty == GgmlType::F16 {
                let halves: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
                assert_eq!(dequantize(&t), halves);
            }
        }
    }
}

/// llama.cpp's Q4_K_M mixture (`llama_tensor_get_type` in src/llama-quant.cpp, llama.cpp master of
/// 2025 — the rules for LLAMA_FTYPE_MOSTLY_Q4_K_M are unchanged since b4748): `attn_v.weight` and
/// `ffn_down.weight` get q6_K in the layers where `use_more_bits(i, n) = i < n/8 || i >= 7n/8 ||
/// (i - n/8) % 3 == 2`; `output.weight` q6_K; everything else 2-D q4_K; norms f32. For LLaMA-13B
/// (40 layers) the q6_K layers, worked out by hand from that rule, are these:
const Q6K_LAYERS_40: [usize; 20] = [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39];

#[test]
fn q4_k_m_mixture_follows_llama_cpp() {
    let t = |name: &str, dims: &[usize]| tensor_type(QuantizeTarget::Q4KM, name, dims, 40, true);
    for layer in 0..40 {
        let want = if Q6K_LAYERS_40.contains(&layer) { GgmlType::Q6_K } else { GgmlType::Q4_K };
        assert_eq!(t(&format!("blk.{layer}.attn_v.weight"), &[5120, 5120]), want, "attn_v {layer}");
        assert_eq!(t(&format!("blk.{layer}.ffn_down.weight"), &[13824, 5120]), want, "ffn_down {layer}");
        for other in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(t(&format!("blk.{layer}.{other}.weight"), &[5120, 5120]), GgmlType::Q4_K);
        }
        assert_eq!(t(&format!("blk.{layer}.attn_norm.weight"), &[5120]), GgmlType::F32);
    }
    assert_eq!(t("output.weight", &[5120, 32001]), GgmlType::Q6_K);
    assert_eq!(t("token_embd.weight", &[5120, 32001]), GgmlType::Q4_K);
    assert_eq!(t("output_norm.weight", &[5120]), GgmlType::F32);
    // LLaMA-7B, 32 layers: i < 4, i >= 28, and 6, 9, …, 27.
    let more: Vec<usize> = (0..32)
        .filter(|&i| {
            tensor_type(QuantizeTarget::Q4KM, &format!("blk.{i}.attn_v.weight"), &[4096, 4096], 32, true)
                == GgmlType::Q6_K
        })
        .collect();
    assert_eq!(more, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
    // A tied output: the token embedding takes the output's type.
    assert_eq!(tensor_type(QuantizeTarget::Q4KM, "token_embd.weight", &[4096, 32000], 32, false), GgmlType::Q6_K);
    // q4_0 / q8_0: the output goes to q6_K (q8_0 stays q8_0), nothing else changes.
    assert_eq!(tensor_type(QuantizeTarget::Q4_0, "output.weight", &[5120, 32001], 40, true), GgmlType::Q6_K);
    assert_eq!(tensor_type(QuantizeTarget::Q8_0, "output.weight", &[5120, 32001], 40, true), GgmlType::Q8_0);
    assert_eq!(tensor_type(QuantizeTarget::Q4_0, "blk.0.attn_v.weight", &[5120, 5120], 40, true), GgmlType::Q4_0);
    // Fallbacks for rows that are not whole blocks (`convert_incompatible_tensor`): q4_K → q5_0,
    // q6_K → q8_0, then f16; the output with rows not whole 256-blocks → q8_0.
    assert_eq!(t("blk.5.attn_q.weight", &[64, 64]), GgmlType::Q5_0);
    assert_eq!(t("blk.0.attn_v.weight", &[64, 64]), GgmlType::Q8_0);
    assert_eq!(t("blk.5.ffn_down.weight", &[172, 64]), GgmlType::F16);
    assert_eq!(t("output.weight", &[64, 512]), GgmlType::Q8_0);
    assert_eq!(t("output.weight", &[48, 512]), GgmlType::F16);
}

#[test]
fn q4_k_m_of_the_tiny_model_uses_the_fallbacks() {
    let dir = TempDir::new("quant-q4km");
    let out = dir.join("m.gguf");
    quantize(&fixture(TINY_A), QuantizeTarget::Q4KM, Some(GgufVocab::synthetic(512).unwrap()), &out).unwrap();
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.get_u32("general.file_type").unwrap(), Some(15));
    let ty = |name: &str| file.tensor(name).unwrap().ty;
    // hidden 64: q4_K → q5_0; attn_v of both layers (n/8 = 0, 7n/8 = 1: layer 1 gets more bits; layer 0
    // (0 - 0) % 3 != 2, but i >= 7*2/8 = 1 only for layer 1) q6_K → q8_0.
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::F16);
    assert_eq!(ty("output.weight"), GgmlType::Q8_0);
    assert_eq!(ty("token_embd.weight"), GgmlType::Q5_0);
    assert_eq!(ty("output_norm.weight"), GgmlType::F32);
}

#[test]
fn bad_requests_leave_nothing_behind() {
    let dir = TempDir::new("quant-bad");
    let out = dir.join("m.gguf");
    expect_err(
        quantize(&fixture(TINY_A), QuantizeTarget::F16, Some(GgufVocab::synthetic(300).unwrap()), &out),
        &["300 tokens", "512"],
    );
    expect_err(quantize(&fixture(TINY_A), QuantizeTarget::F16, None, &out), &["no vocabulary"]);
    expect_err(quantize(&dir.join("nope"), QuantizeTarget::F16, None, &out), &["does not exist"]);
    expect_err(quantize(&fixture("tokenizer/tokenizer.model"), QuantizeTarget::F16, None, &out), &["not a GGUF file"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no output, no temporary left");
    // An existing output is kept unless forced.
    std::fs::write(&out, b"keep").unwrap();
    expect_err(
        quantize(&fixture(TINY_A), QuantizeTarget::F16, Some(GgufVocab::synthetic(512).unwrap()), &out),
        &["already exists", "--force"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    // A cancelled job removes its temporary folder.
    let cancel = AtomicBool::new(true);
    let request = QuantizeRequest {
        model: fixture(TINY_A),
        target: QuantizeTarget::F16,
        vocab: Some(GgufVocab::synthetic(512).unwrap()),
        name: None,
        out: dir.join("cancelled.gguf"),
        force: false,
        threads: 1,
    };
    expect_err(
        run_quantize(&request, &mut JobControl { cancel: &cancel, progress: &mut NoProgress }),
        &["interrupted"],
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("m.gguf")]);
}

/// A tiny model with grouped-query attention (4 query heads, 2 key/value heads), written here: k must
/// be permuted with the key/value head count, as `LlamaModel.modify_tensors` does.
#[test]
fn grouped_query_attention_permutes_k_with_the_kv_heads() {
    let dir = TempDir::new("quant-gqa");
    let model = dir.join("gqa");
    std::fs::create_dir(&model).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": false
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let parsed = LlamaConfig::from_dir(&model).unwrap();
    let mut counter = 0u32;
    let tensors: Vec<(String, &str, Vec<usize>, Vec<u8>)> = parsed
        .expected_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            // Every element distinct, so any misplaced row shows.
            let bytes = (0..n)
                .flat_map(|_| {
                    counter += 1;
                    (counter as f32).to_le_bytes()
                })
                .collect();
            (name, "F32", shape, bytes)
        })
        .collect();
    write_safetensors(&model.join("model.safetensors"), &tensors);
    let out = dir.join("gqa.gguf");
    quantize(&model, QuantizeTarget::F32, Some(GgufVocab::synthetic(300).unwrap()), &out).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let checkpoint = Checkpoint::open(&model).unwrap();
    assert_eq!(file.tensor("blk.0.attn_k.weight").unwrap().dims, [64, 32]);
    for t in file.tensors() {
        assert_eq!(dequantize(&t), hf_in_gguf_order(&checkpoint, &parsed, t.name), "{}", t.name);
    }
    let back = file.llama_config().unwrap();
    assert_eq!((back.num_key_value_heads, back.rope_theta, back.max_position_embeddings), (2, 500000.0, 4096));
    assert_eq!(file.get_u32("llama.attention.head_count_kv").unwrap(), Some(2));
}

#[test]
fn permutation_helpers_match_the_converter() {
    let (heads, head_dim, cols) = (3, 8, 5);
    let w: Vec<f32> = (0..heads * head_dim * cols).map(|i| i as f32).collect();
    let want = reference_permute(&w, heads * head_dim, cols, heads);
    let permuted = vicuna_weights::permute_rows_for_gguf(&w, cols, head_dim);
    assert_eq!(permuted, want);
    assert_ne!(permuted, w);
    assert_eq!(vicuna_weights::unpermute_rows_from_gguf(&permuted, cols, head_dim), w);
}

/// Seeded corruptions of a real LLaMA GGUF (hyper-parameters, vocabulary, tensor infos): opening,
/// reading the config and the vocabulary, and requantizing each damaged file that still opens give
/// errors or results, never a panic, and never an output file when they fail.
#[test]
fn corrupted_llama_files_never_panic() {
    let dir = TempDir::new("quant-fuzz");
    let base = dir.join("base.gguf");
    quantize(&fixture(TINY_A), QuantizeTarget::F16, Some(GgufVocab::synthetic(512).unwrap()), &base).unwrap();
    let bytes = std::fs::read(&base).unwrap();
    let header_end = GgufFile::open(&base).unwrap().data_offset();
    let mut state = 0x0DDB_A11C_0FFE_E123u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let damaged_path = dir.join("damaged.gguf");
    let out = dir.join("out.gguf");
    let (mut refused, mut requantized) = (0, 0);
    for round in 0..600 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + next() % 3 {
            // Half of the hits in the first 2 KB (counts, hyper-parameters, start of the vocabulary),
            // the rest anywhere in the header (the vocabulary, the tensor infos at its end).
            let span = if next() % 2 == 0 { 2048.min(header_end) } else { header_end };
            let at = (next() as usize) % span;
            damaged[at] = if next() % 2 == 0 { next() as u8 } else { damaged[at] ^ (1 << (next() % 8)) };
        }
        std::fs::write(&damaged_path, &damaged).unwrap();
        let Ok(file) = GgufFile::open(&damaged_path) else {
            refused += 1;
            continue;
        };
        let _ = file.llama_config();
        let _ = file.vocab();
        drop(file);
        match quantize(&damaged_path, QuantizeTarget::Q8_0, None, &out) {
            Ok(_) => {
                requantized += 1;
                std::fs::remove_file(&out).unwrap();
            }
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                assert!(!out.exists(), "round {round}: a failed run left {}", out.display());
            }
        }
    }
    assert!(refused > 100 && requantized > 10, "refused {refused}, requantized {requantized}");
}
