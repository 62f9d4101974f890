//! The forward pass against Hugging Face transformers: every fixture folder (safetensors and
//! sharded PyTorch .bin, f32 and f16, 2023-style configs) must give transformers' logits within
//! 1e-4, the same argmax at every position, and the same 20 greedy tokens — by full recompute and
//! through the KV cache.

use std::path::PathBuf;

use serde_json::Value;
use vicuna_engine::{argmax, generate, GenerationConfig, SamplingParams};
use vicuna_model::candle_core::{Device, Tensor};
use vicuna_model::{KvCache, Llama};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/models"))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// All-position logits `[seq][vocab]` by one full pass.
fn all_logits(model: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input, None).unwrap();
    logits.squeeze(0).unwrap().to_vec2().unwrap()
}

fn check_variant(variant: &str, expected_file: &str) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(variant).join(expected_file)).unwrap()).unwrap();
    let folders = expected["weight_folders"].as_array().unwrap();
    assert!(!folders.is_empty());
    for folder in folders {
        let dir = fixtures().join(variant).join(folder.as_str().unwrap());
        let model = Llama::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for case in expected["cases"].as_array().unwrap() {
            let name = format!("{variant}/{} {}", folder.as_str().unwrap(), case["name"].as_str().unwrap());
            let ids = ids_of(&case["input_ids"]);
            let rows = all_logits(&model, &ids);

            let diff = max_abs_diff(rows.last().unwrap(), &floats_of(&case["last_logits"]));
            assert!(diff <= TOLERANCE, "{name}: last logits differ by {diff}");
            let argmaxes: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
            assert_eq!(argmaxes, ids_of(&case["all_pos_argmax"]), "{name}: per-position argmax");
            if let Some(all) = case.get("all_logits_row_major") {
                let flat: Vec<f32> = rows.concat();
                let diff = max_abs_diff(&flat, &floats_of(all));
                assert!(diff <= TOLERANCE, "{name}: all-position logits differ by {diff}");
            }

            // The same positions one token at a time through the KV cache.
            let mut cache = KvCache::new(&model.config);
            for (pos, &id) in ids.iter().enumerate() {
                let step = model.next_token_logits(&[id], &mut cache).unwrap();
                let diff = max_abs_diff(&step, &rows[pos]);
                assert!(diff <= TOLERANCE, "{name}: cached step {pos} differs from full pass by {diff}");
            }

            let want = ids_of(&case["greedy_new_tokens"]);
            let mut context = ids.clone();
            for _ in 0..want.len() {
                let next = argmax(all_logits(&model, &context).last().unwrap());
                context.push(next);
            }
            assert_eq!(&context[ids.len()..], &want[..], "{name}: greedy by full recompute");

            let config = GenerationConfig {
                sampling: SamplingParams { do_sample: false, ..Default::default() },
                max_new_tokens: want.len(),
                ignore_eos: true,
                ..Default::default()
            };
            let generation = generate(&model, None, &ids, &config, |_| {}).unwrap();
            assert_eq!(generation.ids, want, "{name}: greedy through the KV cache");
        }
    }
}

#[test]
fn tiny_a_f32_matches_transformers() {
    check_variant("tiny-a", "expected_f32.json");
}

#[test]
fn tiny_a_f16_matches_transformers() {
    check_variant("tiny-a", "expected_f16.json");
}

#[test]
fn tiny_b_f32_matches_transformers() {
    check_variant("tiny-b", "expected_f32.json");
}

#[test]
fn tiny_b_f16_matches_transformers() {
    check_variant("tiny-b", "expected_f16.json");
}

#[test]
fn tiny_v32001_matches_transformers() {
    check_variant("tiny-v32001", "expected_f16.json");
}

/// Sequences at different points (a decoding step, a prompt chunk after a cached prefix, a fresh
/// prompt) batched into one ragged step give each its own full-pass logits.
#[test]
fn ragged_batch_equals_each_sequence_alone() {
    let model = Llama::load(&fixtures().join("tiny-b/safetensors-f32"), &Device::Cpu).unwrap();
    let a: Vec<u32> = vec![1, 17, 250, 3, 999, 42];
    let b: Vec<u32> = (0..40).map(|i| (i * 37 % 1000) as u32).collect();
    let c: Vec<u32> = vec![1, 5, 6, 7];
    let (mut cache_a, mut cache_b, mut cache_c) =
        (KvCache::new(&model.config), KvCache::new(&model.config), KvCache::new(&model.config));
    model.next_token_logits(&a[..5], &mut cache_a).unwrap();
    model.next_token_logits(&b[..30], &mut cache_b).unwrap();
    let logits =
        model.forward_ragged(&mut [(&a[5..], &mut cache_a), (&b[30..], &mut cache_b), (&c[..], &mut cache_c)]).unwrap();
    for (got, full) in logits.iter().zip([&a, &b, &c]) {
        let want = all_logits(&model, full);
        let diff = max_abs_diff(got, want.last().unwrap());
        assert!(diff <= TOLERANCE, "ragged step differs from the full pass by {diff}");
    }
    assert_eq!((cache_a.len(), cache_b.len(), cache_c.len()), (6, 40, 4));
}

/// The cache grows by doubling; positions written before and after each growth stay right.
#[test]
fn cache_growth_keeps_every_position() {
    let model = Llama::load(&fixtures().join("tiny-a/safetensors-f32"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..150).map(|i| (i * 7 % 512) as u32).collect();
    let full = all_logits(&model, &ids);
    let mut cache = KvCache::new(&model.config);
    // Uneven chunks so that growth happens inside a chunk as well as between steps.
    let mut pos = 0;
    for chunk in [1, 62, 3, 70, 14] {
        let step = model.next_token_logits(&ids[pos..pos + chunk], &mut cache).unwrap();
        pos += chunk;
        let diff = max_abs_diff(&step, &full[pos - 1]);
        assert!(diff <= TOLERANCE, "after {pos} positions the cached logits differ by {diff}");
    }
    assert_eq!(cache.len(), 150);
}
