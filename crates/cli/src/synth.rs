//! `vicuna synth`: a LLaMA folder of a real shape with random weights, for testing and
//! benchmarking the tools without downloading a model.
//!
//! It writes Hugging Face folders (`--dtype`, `--out DIR`), or GGUF files (`--type q4_0`, or an
//! `--out` ending in `.gguf`) holding the same random weights, with a made-up vocabulary that
//! llama.cpp accepts unless `--tokenizer` gives a real one.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vicuna_weights::{
    run_synth, run_synth_gguf, DType, GgufVocab, LlamaConfig, QuantizeTarget, SynthRequest, SynthShape,
};

use crate::common::compute_threads;
use crate::output::{run_job, WriteArgs};
use crate::quantize::GgufTypeArg;
use crate::Result;
use vicuna_engine::vocab_from_tokenizer;

#[derive(Clone, Copy, ValueEnum)]
pub enum ShapeArg {
    /// hidden 64, intermediate 172, 2 layers, 4 heads, vocab 32000 (a few MB).
    Tiny,
    /// hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32001 (58 M parameters, 233 MB in f32): the trainer's benchmark.
    #[value(name = "58m")]
    Small58M,
    /// hidden 192, intermediate 512, 8 layers, 6 heads, vocab 32001 (16 M parameters, 63 MB in f32): the demo chat model's shape.
    #[value(name = "demo")]
    Demo16M,
    /// TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 key/value heads, vocab 32000 (2.2 GB in f16).
    #[value(name = "1b")]
    OneB,
    /// LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000 (13.5 GB in f16).
    #[value(name = "7b")]
    SevenB,
    /// LLaMA-13B as StableVicuna: hidden 5120, intermediate 13824, 40 layers, 40 heads, vocab 32001 (26 GB in f16).
    #[value(name = "13b")]
    ThirteenB,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F16,
    F32,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F16 => DType::F16,
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The same element types for tensors written by the trainer (candle's).
impl From<DTypeArg> for vicuna_model::candle_core::DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F16 => vicuna_model::candle_core::DType::F16,
            DTypeArg::F32 => vicuna_model::candle_core::DType::F32,
            DTypeArg::Bf16 => vicuna_model::candle_core::DType::BF16,
        }
    }
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long, value_enum)]
    pub shape: ShapeArg,
    /// Element type of the weights.
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: DTypeArg,
    /// Vocabulary size instead of the shape's own (e.g. 32001 for a delta with [PAD]).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Random seed: the same seed gives the same weights, whatever the thread count.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a GGUF file with tensors of this type instead of a folder.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub ty: Option<GgufTypeArg>,
    /// For GGUF: the tokenizer.model (or its folder) to embed instead of a made-up vocabulary.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The folder to write (or the file, for GGUF).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub write: WriteArgs,
}

pub fn run_synth_command(args: SynthArgs, threads_flag: Option<usize>) -> Result<()> {
    let shape = match args.shape {
        ShapeArg::Tiny => SynthShape::Tiny,
        ShapeArg::Small58M => SynthShape::Small58M,
        ShapeArg::Demo16M => SynthShape::Demo16M,
        ShapeArg::OneB => SynthShape::OneB,
        ShapeArg::SevenB => SynthShape::SevenB,
        ShapeArg::ThirteenB => SynthShape::ThirteenB,
    };
    let dtype = DType::from(args.dtype);
    let is_gguf = args.ty.is_some() || args.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let request = SynthRequest {
        shape,
        dtype,
        vocab: args.vocab,
        seed: args.seed,
        out: args.out,
        force: args.write.force,
        shard_size: args.write.shard_size,
        threads: compute_threads(threads_flag),
    };
    if !is_gguf {
        if args.tokenizer.is_some() {
            return Err("--tokenizer applies to GGUF output (--type, or --out FILE.gguf)".into());
        }
        return run_job(args.write.quiet, |control| run_synth(&request, control));
    }
    let target = match (args.ty, dtype) {
        (Some(ty), _) => QuantizeTarget::from(ty),
        (None, DType::F32) => QuantizeTarget::F32,
        (None, DType::F16) => QuantizeTarget::F16,
        (None, DType::BF16) => {
            return Err("GGUF output in bf16 is not offered; pass --type f16 or another --type".into())
        }
    };
    let config = LlamaConfig::from_json_value(&shape.config_json(request.vocab, dtype), "synth config")?;
    let vocab = match &args.tokenizer {
        Some(path) => vocab_from_tokenizer(path, config.vocab_size)?,
        None => GgufVocab::synthetic(config.vocab_size)?,
    };
    run_job(args.write.quiet, |control| run_synth_gguf(&request, target, &vocab, control))
}
