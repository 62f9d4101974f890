//! Synthetic LLaMA folders of real shapes, with random weights, so the tools can be tested and
//! benchmarked at full size without downloading anything.
//!
//! Weights are normal(0, 0.02) (transformers' `initializer_range`), RMSNorm weights are 1: a
//! model that runs sanely (finite, unsurprising logits). Values come from a counter-based
//! generator keyed by (seed, tensor, block), so a folder depends on the seed alone, not on the
//! number of threads, and is written in bounded memory by the streaming safetensors writer.

use crate::config::LlamaConfig;
use crate::delta::natural_key;
use crate::dtype::DType;
use crate::error::{bail, Result};
use crate::output::{generation_config, json_file_bytes, write_in_background, JobControl, Manifest, StagedDir};
use crate::safetensors_writer::{write_small_file, ShardedWriter, TensorSpec};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde_json::{json, Value};
use std::path::PathBuf;

/// The model shapes synth knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// hidden 64, intermediate 172, 2 layers, 4 heads, vocab 32000: for tests.
    Tiny,
    /// hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32001 (58 M parameters): a small but
    /// real shape, the trainer's benchmark.
    Small58M,
    /// hidden 192, intermediate 512, 8 layers, 6 heads, vocab 32001 (16 M parameters): the demo chat
    /// model's shape (models/demo), small enough for the whole recipe on two cores.
    Demo16M,
    /// TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 key/value heads,
    /// vocab 32000 (1.1 B parameters, 2.2 GB in float16).
    OneB,
    /// LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000.
    SevenB,
    /// LLaMA-13B as StableVicuna uses it: hidden 5120, intermediate 13824, 40 layers, 40 heads,
    /// vocab 32001 (LLaMA's 32000 and `[PAD]`).
    ThirteenB,
}

impl SynthShape {
    /// `config.json` of this shape with `vocab` (default: the shape's own) and `dtype`.
    pub fn config_json(self, vocab: Option<usize>, dtype: DType) -> Value {
        // (hidden, intermediate, layers, heads, key/value heads, vocab, rms_norm_eps)
        let (hidden, intermediate, layers, heads, kv_heads, default_vocab, eps) = match self {
            SynthShape::Tiny => (64, 172, 2, 4, 4, 32000, 1e-6),
            SynthShape::Small58M => (512, 1376, 8, 8, 8, 32001, 1e-6),
            SynthShape::Demo16M => (192, 512, 8, 6, 6, 32001, 1e-6),
            SynthShape::OneB => (2048, 5632, 22, 32, 4, 32000, 1e-5),
            SynthShape::SevenB => (4096, 11008, 32, 32, 32, 32000, 1e-6),
            SynthShape::ThirteenB => (5120, 13824, 40, 40, 40, 32001, 1e-6),
        };
        let torch_dtype = match dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab.unwrap_or(default_vocab),
            "max_position_embeddings": 2048,
            "rms_norm_eps": eps,
            "rope_theta": 10000.0,
            "initializer_range": STD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": false,
            "torch_dtype": torch_dtype,
            "use_cache": true,
        })
    }
}

/// One synth run.
#[derive(Clone, Debug)]
pub struct SynthRequest {
    pub shape: SynthShape,
    pub dtype: DType,
    /// Vocabulary size instead of the shape's own.
    pub vocab: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    pub force: bool,
    pub shard_size: u64,
    pub threads: usize,
}

/// Standard deviation of the random weights (transformers' default `initializer_range`).
const STD: f32 = 0.02;

/// Elements drawn from one generator key: the unit of reproducibility and of parallel work.
const BLOCK: usize = 1 << 16;

/// Elements per chunk handed to the writer (small, for the reason given in delta.rs).
const CHUNK_ELEMENTS: usize = 1 << 19;

/// Writes the folder: config.json, generation_config.json and sharded safetensors.
pub fn run_synth(request: &SynthRequest, control: &mut JobControl) -> Result<Manifest> {
    if request.vocab == Some(0) {
        bail!("--vocab must be at least 1");
    }
    let config_json = request.shape.config_json(request.vocab, request.dtype);
    let config = LlamaConfig::from_json_value(&config_json, "synth config")?;
    let mut specs: Vec<TensorSpec> = config
        .expected_shapes()
        .into_iter()
        .map(|(name, shape)| TensorSpec { name, dtype: request.dtype, shape })
        .collect();
    specs.sort_by_cached_key(|t| natural_key(&t.name));

    let staged = StagedDir::create(&request.out, request.force)?;
    let dir = staged.path().to_path_buf();
    let Value::Object(config_map) = &config_json else { unreachable!("config_json builds an object") };
    let mut files = vec![
        write_small_file(&dir, "config.json", &json_file_bytes(&config_json))?,
        write_small_file(&dir, "generation_config.json", &json_file_bytes(&generation_config(config_map)))?,
    ];
    let total: u64 = specs.iter().map(TensorSpec::byte_len).sum();
    control.progress.phase("synth", total);
    let writer = ShardedWriter::create(&dir, specs.clone(), request.shard_size, false)?;
    let threads = request.threads.max(1);
    let written = write_in_background(writer, |sink| {
        for (index, spec) in specs.iter().enumerate() {
            let numel: usize = spec.shape.iter().product();
            let is_norm = spec.name.ends_with("norm.weight");
            for start in (0..numel).step_by(CHUNK_ELEMENTS) {
                control.check_cancel(&request.out)?;
                let end = (start + CHUNK_ELEMENTS).min(numel);
                let mut out = sink.buffer((end - start) * spec.dtype.size_in_bytes());
                fill_parallel(request.seed, index as u64, start, is_norm, spec.dtype, &mut out, threads);
                control.progress.advance(out.len() as u64);
                sink.send(out)?;
            }
        }
        Ok(())
    })?;
    files.extend(written.files);
    control.check_cancel(&request.out)?;
    staged.commit()?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Manifest { target: request.out.clone(), files, tensors: specs.len(), bytes_read: 0, verified: false })
}

/// Fills `out` with elements `first ..` of tensor `tensor`, blocks split among `threads`.
/// `first` is a multiple of [`BLOCK`].
fn fill_parallel(seed: u64, tensor: u64, first: usize, is_norm: bool, dtype: DType, out: &mut [u8], threads: usize) {
    let es = dtype.size_in_bytes();
    let blocks = (out.len() / es).div_ceil(BLOCK);
    let per_thread = blocks.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per_thread * BLOCK * es).enumerate() {
            scope.spawn(move || {
                for (j, block) in part.chunks_mut(BLOCK * es).enumerate() {
                    let index = (first / BLOCK + i * per_thread + j) as u64;
                    fill_block(seed, tensor, index, is_norm, dtype, block);
                }
            });
        }
    });
}

/// One block of little-endian values: all 1 for a norm, else normal(0, [`STD`]) drawn from the
/// generator keyed by (seed, tensor, block).
fn fill_block(seed: u64, tensor: u64, block: u64, is_norm: bool, dtype: DType, out: &mut [u8]) {
    let n = out.len() / dtype.size_in_bytes();
    let values = random_values(seed, tensor, block, is_norm, n);
    match dtype {
        DType::F32 => {
            for (dst, v) in out.chunks_exact_mut(4).zip(&values) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            let mut halves = vec![f16::ZERO; n];
            halves.convert_from_f32_slice(&values);
            for (dst, h) in out.chunks_exact_mut(2).zip(&halves) {
                dst.copy_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for (dst, v) in out.chunks_exact_mut(2).zip(&values) {
                dst.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
}

/// The first `n` (at most [`BLOCK`]) values of block `block` of tensor `tensor`: all 1 for a norm,
/// else normal(0, [`STD`]) drawn from the generator keyed by (seed, tensor, block).
pub(crate) fn random_values(seed: u64, tensor: u64, block: u64, is_norm: bool, n: usize) -> Vec<f32> {
    let mut values = vec![1.0f32; n];
    if !is_norm {
        let mut state = splitmix64(splitmix64(seed ^ splitmix64(tensor)) ^ block);
        let mut next_unit = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            // 24 random bits → (0, 1]: never 0, so the logarithm below is finite.
            ((splitmix64(state) >> 40) as f32 + 1.0) * (1.0 / (1u32 << 24) as f32)
        };
        // Box–Muller: two independent normals from two uniforms.
        for pair in values.chunks_mut(2) {
            let radius = STD * (-2.0 * next_unit().ln()).sqrt();
            let (sin, cos) = (std::f32::consts::TAU * next_unit()).sin_cos();
            pair[0] = radius * cos;
            if let Some(second) = pair.get_mut(1) {
                *second = radius * sin;
            }
        }
    }
    values
}

/// Elements `range` of tensor `tensor` (its index in the folder's natural name order), as f32: the
/// values a synthetic folder holds before rounding to its dtype. Split among `threads` threads; every
/// value depends on its position only, so the result does not depend on the thread count.
pub(crate) fn random_range_parallel(
    seed: u64,
    tensor: u64,
    is_norm: bool,
    numel: usize,
    range: std::ops::Range<usize>,
    threads: usize,
) -> Vec<f32> {
    let per_thread = range.len().div_ceil(threads.max(1)).next_multiple_of(BLOCK);
    let mut out = vec![0f32; range.len()];
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per_thread).enumerate() {
            let start = range.start + i * per_thread;
            scope.spawn(move || {
                part.copy_from_slice(&random_range(seed, tensor, is_norm, numel, start..start + part.len()));
            });
        }
    });
    out
}

/// [`random_range_parallel`] on the calling thread.
fn random_range(seed: u64, tensor: u64, is_norm: bool, numel: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(range.len());
    let mut at = range.start;
    while at < range.end {
        let block = at / BLOCK;
        let block_start = block * BLOCK;
        let block_len = BLOCK.min(numel - block_start);
        let values = random_values(seed, tensor, block as u64, is_norm, block_len);
        let end = range.end.min(block_start + block_len);
        out.extend_from_slice(&values[at - block_start..end - block_start]);
        at = end;
    }
    out
}

/// SplitMix64's output function: a strong 64-bit mix, used as a counter-based generator.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
