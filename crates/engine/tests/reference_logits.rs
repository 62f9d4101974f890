//! The forward pass against Hugging Face transformers: every fixture folder (safetensors and
//! sharded PyTorch .bin, f32 and f16, 2023-style configs) must give transformers' logits within
//! 1e-4, the same argmax at every position, and the same 20 greedy tokens — by full recompute and
//! through the KV cache. Both forward passes are held to it: the inference model (`QuantLlama`,
//! what `generate` runs) and the candle one that training builds on (`Llama`).

#[path = "../../model/tests/expected/mod.rs"]
mod expected;

use std::path::Path;

use expected::{floats_of, ids_of, max_abs_diff, models_dir, read_expected};
use vicuna_engine::{argmax, generate, GenerationConfig, SamplingParams};
use vicuna_model::candle_core::{Device, Tensor};
use vicuna_model::{KvCache, Llama, QuantCache, QuantLlama};

const TOLERANCE: f32 = 1e-4;

/// What these tests need of a forward pass.
trait Forward {
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// All-position logits `[seq][vocab]` by one full pass.
    fn all_logits(&self, ids: &[u32]) -> Vec<Vec<f32>>;
    /// One step of several sequences; each one's last-position logits.
    fn ragged(&self, sequences: &mut [(&[u32], &mut Self::Cache)]) -> Vec<Vec<f32>>;
    fn cache_len(cache: &Self::Cache) -> usize;
    /// `n` greedy tokens after `ids`, through the KV cache.
    fn greedy(&self, ids: &[u32], n: usize) -> Vec<u32>;

    fn step(&self, ids: &[u32], cache: &mut Self::Cache) -> Vec<f32> {
        self.ragged(&mut [(ids, cache)]).pop().unwrap()
    }
}

impl Forward for Llama {
    type Cache = KvCache;

    fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config)
    }

    fn all_logits(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = self.forward(&input, None).unwrap();
        logits.squeeze(0).unwrap().to_vec2().unwrap()
    }

    fn ragged(&self, sequences: &mut [(&[u32], &mut KvCache)]) -> Vec<Vec<f32>> {
        self.forward_ragged(sequences).unwrap()
    }

    fn cache_len(cache: &KvCache) -> usize {
        cache.len()
    }

    fn greedy(&self, ids: &[u32], n: usize) -> Vec<u32> {
        let mut cache = self.new_cache();
        let mut input = ids.to_vec();
        let mut out = Vec::new();
        while out.len() < n {
            let next = argmax(&self.step(&input, &mut cache));
            out.push(next);
            input = vec![next];
        }
        out
    }
}

impl Forward for QuantLlama {
    type Cache = QuantCache;

    fn new_cache(&self) -> QuantCache {
        QuantLlama::new_cache(self)
    }

    fn all_logits(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let logits = self.forward_all(ids, &mut self.new_cache()).unwrap();
        logits.chunks_exact(self.config().vocab_size).map(<[f32]>::to_vec).collect()
    }

    fn ragged(&self, sequences: &mut [(&[u32], &mut QuantCache)]) -> Vec<Vec<f32>> {
        self.forward_ragged(sequences).unwrap()
    }

    fn cache_len(cache: &QuantCache) -> usize {
        cache.len()
    }

    /// Through `generate`, the loop the CLI and the tests of the engine run.
    fn greedy(&self, ids: &[u32], n: usize) -> Vec<u32> {
        let config = GenerationConfig {
            sampling: SamplingParams { do_sample: false, ..Default::default() },
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        };
        generate(self, None, ids, &config, |_| {}).unwrap().ids
    }
}

fn candle(dir: &Path) -> Llama {
    Llama::load(dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn native(dir: &Path) -> QuantLlama {
    QuantLlama::load(dir, 2).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn check_variant(variant: &str, expected_file: &str) {
    check_forward(variant, expected_file, candle, "candle");
    check_forward(variant, expected_file, native, "native");
}

fn check_forward<M: Forward>(variant: &str, expected_file: &str, load: fn(&Path) -> M, kind: &str) {
    let expected = read_expected(variant, expected_file);
    let folders = expected["weight_folders"].as_array().unwrap();
    assert!(!folders.is_empty());
    for folder in folders {
        let dir = models_dir().join(variant).join(folder.as_str().unwrap());
        let model = load(&dir);
        for case in expected["cases"].as_array().unwrap() {
            let name = format!("{kind} {variant}/{} {}", folder.as_str().unwrap(), case["name"].as_str().unwrap());
            let ids = ids_of(&case["input_ids"]);
            let rows = model.all_logits(&ids);

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
            let mut cache = model.new_cache();
            for (pos, &id) in ids.iter().enumerate() {
                let diff = max_abs_diff(&model.step(&[id], &mut cache), &rows[pos]);
                assert!(diff <= TOLERANCE, "{name}: cached step {pos} differs from full pass by {diff}");
            }

            let want = ids_of(&case["greedy_new_tokens"]);
            let mut context = ids.clone();
            for _ in 0..want.len() {
                let next = argmax(model.all_logits(&context).last().unwrap());
                context.push(next);
            }
            assert_eq!(&context[ids.len()..], &want[..], "{name}: greedy by full recompute");
            assert_eq!(model.greedy(&ids, want.len()), want, "{name}: greedy through the KV cache");
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
fn check_ragged_batch<M: Forward>(model: &M) {
    let a: Vec<u32> = vec![1, 17, 250, 3, 999, 42];
    let b: Vec<u32> = (0..40).map(|i| (i * 37 % 1000) as u32).collect();
    let c: Vec<u32> = vec![1, 5, 6, 7];
    let (mut cache_a, mut cache_b, mut cache_c) = (model.new_cache(), model.new_cache(), model.new_cache());
    model.step(&a[..5], &mut cache_a);
    model.step(&b[..30], &mut cache_b);
    let logits = model.ragged(&mut [(&a[5..], &mut cache_a), (&b[30..], &mut cache_b), (&c[..], &mut cache_c)]);
    for (got, full) in logits.iter().zip([&a, &b, &c]) {
        let want = model.all_logits(full);
        let diff = max_abs_diff(got, want.last().unwrap());
        assert!(diff <= TOLERANCE, "ragged step differs from the full pass by {diff}");
    }
    assert_eq!((M::cache_len(&cache_a), M::cache_len(&cache_b), M::cache_len(&cache_c)), (6, 40, 4));
}

#[test]
fn ragged_batch_equals_each_sequence_alone() {
    let dir = models_dir().join("tiny-b/safetensors-f32");
    check_ragged_batch(&candle(&dir));
    check_ragged_batch(&native(&dir));
}

/// The cache grows by doubling; positions written before and after each growth stay right.
fn check_cache_growth<M: Forward>(model: &M) {
    let ids: Vec<u32> = (0..150).map(|i| (i * 7 % 512) as u32).collect();
    let full = model.all_logits(&ids);
    let mut cache = model.new_cache();
    // Uneven chunks so that growth happens inside a chunk as well as between steps.
    let mut pos = 0;
    for chunk in [1, 62, 3, 70, 14] {
        let step = model.step(&ids[pos..pos + chunk], &mut cache);
        pos += chunk;
        let diff = max_abs_diff(&step, &full[pos - 1]);
        assert!(diff <= TOLERANCE, "after {pos} positions the cached logits differ by {diff}");
    }
    assert_eq!(M::cache_len(&cache), 150);
}

#[test]
fn cache_growth_keeps_every_position() {
    let dir = models_dir().join("tiny-a/safetensors-f32");
    check_cache_growth(&candle(&dir));
    check_cache_growth(&native(&dir));
}
