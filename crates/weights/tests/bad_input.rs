//! Broken model folders: each gives one clear, one-line error (and never a panic).

mod common;

use common::{expect_err, fixture, write_safetensors, write_safetensors_raw, TempDir};
use vicuna_weights::{Checkpoint, LlamaConfig};

fn config_text() -> String {
    std::fs::read_to_string(fixture("models/tiny-a/safetensors-f32/config.json")).unwrap()
}

fn config_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> TempDir {
    let dir = TempDir::new("config");
    let mut json: serde_json::Value = serde_json::from_str(&config_text()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    dir
}

#[test]
fn missing_config() {
    let dir = TempDir::new("noconfig");
    let path = dir.join("config.json").display().to_string();
    expect_err(LlamaConfig::from_dir(dir.path()), &[&path, "is missing"]);
    expect_err(LlamaConfig::from_dir(&dir.join("nope")), &["does not exist"]);
}

#[test]
fn garbled_config_json() {
    let dir = TempDir::new("garbled");
    std::fs::write(dir.join("config.json"), "{\n  \"hidden_size\": 64,\n  \"vocab_size\": \n").unwrap();
    let path = dir.join("config.json").display().to_string();
    expect_err(LlamaConfig::from_dir(dir.path()), &[&path, "is not valid JSON", "line"]);
    std::fs::write(dir.join("config.json"), [0xff, 0xfe, b'{']).unwrap();
    expect_err(LlamaConfig::from_dir(dir.path()), &[&path, "not UTF-8"]);
    std::fs::write(dir.join("config.json"), "[1, 2]").unwrap();
    expect_err(LlamaConfig::from_dir(dir.path()), &[&path, "JSON object"]);
}

#[test]
fn config_field_missing_or_wrong_type() {
    let dir = config_with(|m| {
        m.remove("hidden_size");
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["config.json", "`hidden_size`", "missing"]);
    let dir = config_with(|m| {
        m.insert("num_hidden_layers".into(), "2".into());
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["config.json", "`num_hidden_layers`", "positive integer", "\"2\""]);
    let dir = config_with(|m| {
        m.insert("vocab_size".into(), 0.into());
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["`vocab_size`", "positive integer", "found 0"]);
    let dir = config_with(|m| {
        m.insert("rms_norm_eps".into(), (-1.0).into());
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["`rms_norm_eps`"]);
    let dir = config_with(|m| {
        m.insert("eos_token_id".into(), serde_json::json!([]));
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["`eos_token_id`"]);
}

#[test]
fn non_llama_architecture() {
    let dir = config_with(|m| {
        m.insert("architectures".into(), serde_json::json!(["GPTNeoXForCausalLM"]));
        m.insert("model_type".into(), "gpt_neox".into());
    });
    let path = dir.join("config.json").display().to_string();
    let message = expect_err(LlamaConfig::from_dir(dir.path()), &[]);
    assert_eq!(
        message,
        format!("{path}: architecture GPTNeoXForCausalLM is not LLaMA; vicuna runs LlamaForCausalLM models")
    );
}

#[test]
fn heads_that_do_not_divide() {
    let dir = config_with(|m| {
        m.insert("num_attention_heads".into(), 5.into());
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["hidden_size 64 is not divisible by num_attention_heads 5"]);
    let dir = config_with(|m| {
        m.insert("num_key_value_heads".into(), 3.into());
    });
    expect_err(LlamaConfig::from_dir(dir.path()), &["num_attention_heads 4 is not divisible by num_key_value_heads 3"]);
}

#[test]
fn no_weights_at_all() {
    let dir = TempDir::new("empty");
    std::fs::write(dir.join("config.json"), config_text()).unwrap();
    expect_err(Checkpoint::open(dir.path()), &["no weights in", "model.safetensors", "pytorch_model.bin"]);
    expect_err(Checkpoint::open(&dir.join("absent")), &["does not exist"]);
    // A sharded download without its index says so.
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), b"x").unwrap();
    expect_err(Checkpoint::open(dir.path()), &["index", "is missing"]);
    // Meta's original format.
    let dir = TempDir::new("pth");
    std::fs::write(dir.join("consolidated.00.pth"), b"x").unwrap();
    expect_err(Checkpoint::open(dir.path()), &["convert_llama_weights_to_hf"]);
}

#[test]
fn shard_named_in_index_but_absent() {
    let dir = TempDir::copy_of("delta/delta");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let message = expect_err(Checkpoint::open(dir.path()), &[]);
    assert!(
        message.starts_with(&format!(
            "model.safetensors.index.json names model-00002-of-00002.safetensors, which is missing from {}",
            dir.path().display()
        )),
        "{message}"
    );

    let dir = TempDir::copy_of("models/tiny-a/bin-sharded-f32");
    std::fs::remove_file(dir.join("pytorch_model-00003-of-00004.bin")).unwrap();
    expect_err(
        Checkpoint::open(dir.path()),
        &["pytorch_model.bin.index.json names pytorch_model-00003-of-00004.bin, which is missing from"],
    );
}

#[test]
fn index_that_points_outside_the_folder() {
    let dir = TempDir::copy_of("delta/delta");
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    let index = index.replacen("\"model-00002-of-00002.safetensors\"", "\"../model-00002-of-00002.safetensors\"", 1);
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    expect_err(Checkpoint::open(dir.path()), &["not a plain file name"]);
}

#[test]
fn tensor_in_index_but_not_in_its_shard() {
    let dir = TempDir::copy_of("delta/delta");
    let path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    // Move one tensor to the other shard in the index only.
    let name = "model.embed_tokens.weight";
    let shard = map[name].as_str().unwrap().to_string();
    let other =
        if shard.contains("00001") { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" };
    map.insert(name.into(), other.into());
    // And name a tensor that no shard has.
    map.insert("model.layers.9.mlp.up_proj.weight".into(), shard.clone().into());
    std::fs::write(&path, index.to_string()).unwrap();
    expect_err(
        Checkpoint::open(dir.path()),
        &[
            &format!("model.safetensors.index.json lists {name} in {other}, but {other} does not contain it"),
            &format!("lists model.layers.9.mlp.up_proj.weight in {shard}, but {shard} does not contain it"),
            "; ",
        ],
    );
}

/// Rewrites tiny-a f32 with some tensors cut to other shapes.
fn reshaped_copy(cuts: &[(&str, Vec<usize>)]) -> (TempDir, LlamaConfig) {
    let src = fixture("models/tiny-a/safetensors-f32");
    let ckpt = Checkpoint::open(&src).unwrap();
    let dir = TempDir::new("reshaped");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors: Vec<(String, &str, Vec<usize>, Vec<u8>)> = ckpt
        .names()
        .into_iter()
        .map(|name| {
            let info = ckpt.info(name).unwrap();
            let bytes = ckpt.bytes(name).unwrap().into_owned();
            match cuts.iter().find(|(n, _)| *n == name) {
                Some((_, shape)) => {
                    let len = shape.iter().product::<usize>() * 4;
                    (name.to_string(), "F32", shape.clone(), bytes[..len].to_vec())
                }
                None => (name.to_string(), "F32", info.shape.clone(), bytes),
            }
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    let config = LlamaConfig::from_dir(dir.path()).unwrap();
    (dir, config)
}

#[test]
fn tensor_shape_disagreeing_with_config() {
    let (dir, config) = reshaped_copy(&[("model.layers.0.self_attn.q_proj.weight", vec![64, 32])]);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let file = dir.join("model.safetensors").display().to_string();
    expect_err(
        ckpt.check_against(&config),
        &[&format!(
            "model.layers.0.self_attn.q_proj.weight in {file} has shape [64, 32] but config.json implies [64, 64]"
        )],
    );
}

#[test]
fn all_problems_are_listed_in_one_error() {
    let (dir, mut config) = reshaped_copy(&[
        ("model.layers.0.self_attn.q_proj.weight", vec![64, 32]),
        ("model.layers.1.mlp.down_proj.weight", vec![64, 100]),
    ]);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let message = expect_err(
        ckpt.check_against(&config),
        &[
            "2 problems",
            "q_proj.weight in",
            "[64, 32]",
            "model.layers.1.mlp.down_proj.weight in",
            "[64, 100] but config.json implies [64, 172]",
        ],
    );
    assert_eq!(message.matches("; ").count(), 2, "{message}");
    // A config with a layer fewer: the extra layer's tensors are reported too.
    config.num_hidden_layers = 1;
    expect_err(ckpt.check_against(&config), &["unexpected tensor model.layers.1.mlp.up_proj.weight in"]);
    // And one with a layer more: its tensors are missing.
    config.num_hidden_layers = 3;
    expect_err(
        ckpt.check_against(&config),
        &["model.layers.2.self_attn.q_proj.weight is missing (config.json implies shape [64, 64])"],
    );
}

/// A copy of tiny-a's f16 safetensors, for corrupting.
fn safetensors_copy() -> (TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f16");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    (dir, path, bytes)
}

#[test]
fn truncated_safetensors() {
    let (dir, path, bytes) = safetensors_copy();
    let file = path.display().to_string();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    // The last tensor in the file is the one cut short.
    expect_err(Checkpoint::open(dir.path()), &[&file, "past the end of the data", "truncated"]);
    std::fs::write(&path, &bytes[..1000]).unwrap();
    expect_err(Checkpoint::open(dir.path()), &[&file, "header length 2136 runs past the end of the file (1000 bytes)"]);
    std::fs::write(&path, &bytes[..5]).unwrap();
    expect_err(Checkpoint::open(dir.path()), &[&file, "too short (5 bytes)"]);
    std::fs::write(&path, b"").unwrap();
    expect_err(Checkpoint::open(dir.path()), &[&file, "is empty"]);
}

#[test]
fn header_offsets_past_the_end() {
    let dir = TempDir::new("lie");
    let path = dir.join("model.safetensors");
    write_safetensors_raw(&path, r#"{"w":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#, &[0u8; 8]);
    expect_err(
        Checkpoint::open(dir.path()),
        &[&path.display().to_string(), "tensor w", "[0, 1000] past the end of the data (8 bytes)"],
    );
}

#[test]
fn header_offsets_overlapping() {
    let dir = TempDir::new("overlap");
    let path = dir.join("model.safetensors");
    write_safetensors_raw(
        &path,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        &[0u8; 24],
    );
    expect_err(Checkpoint::open(dir.path()), &[&path.display().to_string(), "tensors a [0, 16] and b [8, 24] overlap"]);
}

#[test]
fn header_offsets_reversed_or_wrong_length() {
    let dir = TempDir::new("reversed");
    let path = dir.join("model.safetensors");
    write_safetensors_raw(&path, r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, &[0u8; 8]);
    expect_err(Checkpoint::open(dir.path()), &["tensor w", "reversed data_offsets [8, 0]"]);
    write_safetensors_raw(&path, r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#, &[0u8; 8]);
    expect_err(Checkpoint::open(dir.path()), &["tensor w is F32 of shape [2, 2], which needs 16 bytes", "hold 8"]);
    write_safetensors_raw(
        &path,
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#,
        &[0u8; 8],
    );
    expect_err(Checkpoint::open(dir.path()), &["tensor w", "needs more than"]);
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let dir = TempDir::new("dtype");
    let path = dir.join("model.safetensors");
    let file = path.display().to_string();
    write_safetensors_raw(&path, r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, &[0u8; 8]);
    expect_err(Checkpoint::open(dir.path()), &[&file, "tensor w has unknown dtype \"Q4\""]);
    write_safetensors_raw(&path, r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, &[0u8; 8]);
    let message = expect_err(Checkpoint::open(dir.path()), &[]);
    assert_eq!(message, format!("unsupported dtype I64 for tensor w in {file}; vicuna reads F32, F16 and BF16"));
    // BF16 is read, and widens exactly.
    write_safetensors_raw(
        &path,
        r#"{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
        &[0x80, 0x3f, 0x40, 0xc0],
    );
    assert_eq!(Checkpoint::open(dir.path()).unwrap().to_f32("w").unwrap(), vec![1.0, -3.0]);
}

#[test]
fn huge_header_length() {
    let (dir, path, mut bytes) = safetensors_copy();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    expect_err(
        Checkpoint::open(dir.path()),
        &[&path.display().to_string(), "header length 18446744073709551615 runs past the end"],
    );
    bytes[..8].copy_from_slice(&(200u64 << 20).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    expect_err(Checkpoint::open(dir.path()), &["header length 209715200"]);
}

#[test]
fn garbled_safetensors_header() {
    let (dir, path, mut bytes) = safetensors_copy();
    let original = bytes.clone();
    bytes[20] = 0xff; // not UTF-8
    std::fs::write(&path, &bytes).unwrap();
    expect_err(Checkpoint::open(dir.path()), &[&path.display().to_string(), "header is not UTF-8"]);
    let mut bytes = original;
    bytes[8] = b'['; // JSON, but not an object
    std::fs::write(&path, &bytes).unwrap();
    expect_err(Checkpoint::open(dir.path()), &["header is not a JSON object"]);
    write_safetensors_raw(&path, r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, &[0u8; 4]);
    expect_err(Checkpoint::open(dir.path()), &["tensor w has a shape that is not a list of non-negative integers"]);
    write_safetensors_raw(&path, r#"{"w":{"dtype":"F32","shape":[1]}}"#, &[0u8; 4]);
    expect_err(Checkpoint::open(dir.path()), &["tensor w has no data_offsets pair"]);
}
