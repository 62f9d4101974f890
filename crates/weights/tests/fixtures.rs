//! The real fixture folders (written by PyTorch / transformers) open, agree across
//! formats bit for bit, and match their configs.

mod common;

use common::{fixture, TempDir};
use half::f16;
use std::borrow::Cow;
use std::collections::BTreeSet;
use vicuna_weights::{Checkpoint, DType, LlamaConfig};

const MODEL_FOLDERS: &[&str] = &[
    "models/tiny-a/safetensors-f32",
    "models/tiny-a/bin-sharded-f32",
    "models/tiny-a/safetensors-f16",
    "models/tiny-a/bin-sharded-f16",
    "models/tiny-b/safetensors-f32",
    "models/tiny-b/bin-sharded-f16",
    "models/tiny-v32001/safetensors-f16",
    "delta/base",
    "delta/delta",
];

fn open(rel: &str) -> (LlamaConfig, Checkpoint) {
    let dir = fixture(rel);
    let config = LlamaConfig::from_dir(&dir).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let checkpoint = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (config, checkpoint)
}

#[test]
fn every_fixture_folder_opens_and_matches_its_config() {
    for rel in MODEL_FOLDERS {
        let (config, ckpt) = open(rel);
        ckpt.check_against(&config).unwrap_or_else(|e| panic!("{rel}: {e}"));
        // Exactly the expected tensors: inv_freq buffers are not listed.
        let expected: BTreeSet<String> = config.expected_shapes().into_iter().map(|(n, _)| n).collect();
        let names: BTreeSet<String> = ckpt.names().into_iter().map(str::to_string).collect();
        assert_eq!(names, expected, "{rel}");
        assert!(ckpt.names().windows(2).all(|w| w[0] < w[1]), "names are sorted");
        assert!(!ckpt.names().iter().any(|n| n.contains("inv_freq")), "{rel}");
        for name in ckpt.names() {
            let info = ckpt.info(name).unwrap();
            let bytes = ckpt.bytes(name).unwrap();
            assert_eq!(bytes.len(), info.numel() * info.dtype.size_in_bytes(), "{rel} {name}");
            // Every fixture tensor is contiguous: served straight from the memory map.
            assert!(matches!(bytes, Cow::Borrowed(_)), "{rel} {name} was copied");
            assert!(info.file.starts_with(fixture(rel)), "{rel} {name}: {:?}", info.file);
            assert_eq!(ckpt.to_f32(name).unwrap().len(), info.numel());
        }
        assert_eq!(ckpt.dir(), fixture(rel));
    }
}

#[test]
fn dtypes_and_shards_are_reported() {
    let (_, ckpt) = open("models/tiny-a/bin-sharded-f16");
    let embed = ckpt.info("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.dtype, DType::F16);
    assert_eq!(embed.shape, vec![512, 64]);
    assert!(embed.file.ends_with("pytorch_model-00001-of-00002.bin"));
    let (_, ckpt) = open("models/tiny-a/safetensors-f32");
    assert_eq!(ckpt.info("lm_head.weight").unwrap().dtype, DType::F32);
    assert!(ckpt.info("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
    assert!(ckpt.bytes("no.such.tensor").unwrap_err().to_string().contains("no tensor named no.such.tensor"));
}

/// Both folders hold the same weights: every tensor must be bit-identical.
fn assert_bit_identical(a: &str, b: &str) {
    let (_, ca) = open(a);
    let (_, cb) = open(b);
    assert_eq!(ca.names(), cb.names(), "{a} vs {b}");
    for name in ca.names() {
        let (ia, ib) = (ca.info(name).unwrap(), cb.info(name).unwrap());
        assert_eq!((ia.dtype, &ia.shape), (ib.dtype, &ib.shape), "{name}");
        assert!(ca.bytes(name).unwrap() == cb.bytes(name).unwrap(), "{name} differs between {a} and {b}");
    }
}

#[test]
fn bin_and_safetensors_f32_are_bit_identical() {
    assert_bit_identical("models/tiny-a/safetensors-f32", "models/tiny-a/bin-sharded-f32");
}

#[test]
fn bin_and_safetensors_f16_are_bit_identical() {
    assert_bit_identical("models/tiny-a/safetensors-f16", "models/tiny-a/bin-sharded-f16");
}

/// The f16 folders are the f32 weights rounded to f16 (checked across formats: tiny-b's
/// f16 is a 2023-style .bin, its f32 a safetensors file), and to_f32 widens exactly.
#[test]
fn f16_weights_are_the_rounded_f32_weights() {
    for (f32_dir, f16_dir) in [
        ("models/tiny-a/safetensors-f32", "models/tiny-a/safetensors-f16"),
        ("models/tiny-b/safetensors-f32", "models/tiny-b/bin-sharded-f16"),
    ] {
        let (_, wide) = open(f32_dir);
        let (_, narrow) = open(f16_dir);
        for name in wide.names() {
            let want: Vec<f32> = wide.to_f32(name).unwrap().iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            assert_eq!(narrow.to_f32(name).unwrap(), want, "{f16_dir} {name}");
        }
    }
}

#[test]
fn configs_2023_get_transformers_defaults() {
    for rel in ["models/tiny-a/bin-sharded-f16", "models/tiny-b/bin-sharded-f16", "delta/base"] {
        let text = std::fs::read_to_string(fixture(rel).join("config.json")).unwrap();
        assert!(!text.contains("rope_theta") && !text.contains("num_key_value_heads"), "{rel}");
        let config = LlamaConfig::from_dir(&fixture(rel)).unwrap();
        assert_eq!(config.rope_theta, 10000.0);
        assert_eq!(config.num_key_value_heads, config.num_attention_heads);
        assert_eq!(config.head_dim, config.hidden_size / config.num_attention_heads);
        assert_eq!(config.torch_dtype.as_deref(), Some("float16"));
        assert_eq!(config.saved_dtype(), Some("float16"));
    }
    let a = LlamaConfig::from_dir(&fixture("models/tiny-a/safetensors-f32")).unwrap();
    assert_eq!(
        (a.vocab_size, a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.num_attention_heads),
        (512, 64, 172, 2, 4)
    );
    assert_eq!((a.num_key_value_heads, a.head_dim, a.max_position_embeddings), (4, 16, 2048));
    assert_eq!((a.bos_token_id, a.eos_token_id, a.tie_word_embeddings), (1, 2, false));
    assert_eq!((a.rms_norm_eps, a.rope_theta), (1e-6, 10000.0));
    assert_eq!(a.dtype.as_deref(), Some("float32"));
    assert_eq!(a.rope_scaling, None);
    assert_eq!(a.architectures, vec!["LlamaForCausalLM".to_string()]);
    assert_eq!(a.model_type.as_deref(), Some("llama"));
    let v = LlamaConfig::from_dir(&fixture("models/tiny-v32001/safetensors-f16")).unwrap();
    assert_eq!((v.vocab_size, v.head_dim), (32001, 8));
}

#[test]
fn config_round_trips_through_serde() {
    let config = LlamaConfig::from_dir(&fixture("models/tiny-b/bin-sharded-f16")).unwrap();
    let json = serde_json::to_string(&config).unwrap();
    let again: LlamaConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(again, config);
}

#[test]
fn newer_config_shapes() {
    // eos as a list (newer generation configs), grouped-query attention, tied embeddings.
    let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "eos_token_id": [7, 2], "tie_word_embeddings": true,
        "rope_theta": 500000, "pad_token_id": null}"#;
    let c = LlamaConfig::from_json_str(json, "config.json").unwrap();
    assert_eq!((c.eos_token_id, c.num_key_value_heads, c.head_dim, c.rope_theta), (7, 2, 2, 500000.0));
    let shapes = c.expected_shapes();
    let get = |n: &str| shapes.iter().find(|(name, _)| name == n).map(|(_, s)| s.clone());
    assert_eq!(get("model.layers.0.self_attn.q_proj.weight"), Some(vec![8, 8]));
    assert_eq!(get("model.layers.0.self_attn.k_proj.weight"), Some(vec![4, 8]));
    assert_eq!(get("model.layers.0.self_attn.v_proj.weight"), Some(vec![4, 8]));
    assert_eq!(get("model.layers.0.self_attn.o_proj.weight"), Some(vec![8, 8]));
    assert_eq!(get("model.layers.0.mlp.down_proj.weight"), Some(vec![8, 12]));
    assert_eq!(get("lm_head.weight"), None, "tied: no lm_head");
    assert_eq!(shapes.len(), 1 + 9 + 1);
}

/// The delta fixtures: base (2023 .bin) + delta (sharded safetensors) == the independent
/// expected target, bit for bit, after growing the base's vocab rows with zeros. This
/// checks all three readers against data neither of them wrote.
#[test]
fn delta_base_plus_delta_is_the_expected_target() {
    let (_, base) = open("delta/base");
    let (_, delta) = open("delta/delta");
    let target_dir = TempDir::new("target");
    std::fs::copy(fixture("delta/expected_target.safetensors"), target_dir.join("model.safetensors")).unwrap();
    let target = Checkpoint::open(target_dir.path()).unwrap();
    assert_eq!(target.names(), delta.names());
    for name in target.names() {
        assert_eq!(target.info(name).unwrap().dtype, DType::F16);
        let mut b = base.to_f32(name).unwrap();
        let d = delta.to_f32(name).unwrap();
        b.resize(d.len(), 0.0); // embed_tokens / lm_head: 300 → 301 rows
        let sum: Vec<u16> = b.iter().zip(&d).map(|(x, y)| f16::from_f32(x + y).to_bits()).collect();
        let want: Vec<u16> =
            target.bytes(name).unwrap().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(sum, want, "{name}");
    }
}

#[test]
fn delta_fixtures_that_must_fail() {
    let (config, bad) = open("delta/delta-bad-shape");
    let message = common::expect_err(
        bad.check_against(&config),
        &["model.layers.1.mlp.up_proj.weight in ", "has shape [171, 64] but config.json implies [172, 64]"],
    );
    assert!(message.contains("model-0000"), "{message}");
    let (config, missing) = open("delta/delta-missing-tensor");
    common::expect_err(missing.check_against(&config), &["model.layers.1.self_attn.v_proj.weight is missing"]);
}

#[test]
fn checkpoint_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<vicuna_weights::Error>();
    let (_, ckpt) = open("models/tiny-a/safetensors-f16");
    let names = ckpt.names();
    let total: usize = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(5)
            .map(|names| s.spawn(|| names.iter().map(|n| ckpt.to_f32(n).unwrap().len()).sum::<usize>()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(total, ckpt.names().iter().map(|n| ckpt.info(n).unwrap().numel()).sum::<usize>());
}

#[test]
fn safetensors_preferred_over_bin_like_transformers() {
    let dir = TempDir::copy_of("models/tiny-a/bin-sharded-f16");
    std::fs::copy(fixture("models/tiny-a/safetensors-f32/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.info("lm_head.weight").unwrap().dtype, DType::F32);
    assert!(format!("{ckpt:?}").contains("tensors: 21"));
}
