//! `vicuna quantize`: a Hugging Face folder (or a float GGUF) → a GGUF file that llama.cpp loads, in
//! f32, f16, q8_0, q4_0 or llama.cpp's q4_k_m mixture.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vicuna_weights::{run_quantize, GgufVocab, LlamaConfig, QuantizeRequest, QuantizeTarget};

use crate::common::compute_threads;
use crate::output::run_job;
use crate::Result;
use vicuna_engine::vocab_from_tokenizer;

/// GGUF tensor types, named as llama.cpp's `llama-quantize` names them.
#[derive(Clone, Copy, ValueEnum)]
pub enum GgufTypeArg {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    /// q4_K, with q6_K for the output and some attn_v / ffn_down layers (llama.cpp's Q4_K_M).
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl From<GgufTypeArg> for QuantizeTarget {
    fn from(arg: GgufTypeArg) -> QuantizeTarget {
        match arg {
            GgufTypeArg::F32 => QuantizeTarget::F32,
            GgufTypeArg::F16 => QuantizeTarget::F16,
            GgufTypeArg::Q8_0 => QuantizeTarget::Q8_0,
            GgufTypeArg::Q4_0 => QuantizeTarget::Q4_0,
            GgufTypeArg::Q4KM => QuantizeTarget::Q4KM,
        }
    }
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder, or a GGUF file with f32/f16/bf16 tensors.
    #[arg(long)]
    pub model: PathBuf,
    /// The tokenizer.model (or its folder) to embed, when the model folder has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Embed a made-up vocabulary of the model's size (`<unk>`, `<s>`, `</s>`, the 256 byte pieces,
    /// then invented pieces) instead of a tokenizer: for test models that have none.
    #[arg(long, conflicts_with = "tokenizer")]
    pub synthetic_vocab: bool,
    /// Tensor type of the output.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub ty: GgufTypeArg,
    /// The GGUF file to write (it appears only once complete).
    #[arg(long)]
    pub out: PathBuf,
    /// `general.name` in the file (default: the model's folder or file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_quantize_command(args: QuantizeArgs, threads_flag: Option<usize>) -> Result<()> {
    let vocab = if args.model.is_dir() {
        let config = LlamaConfig::from_dir(&args.model)?;
        if args.synthetic_vocab {
            Some(GgufVocab::synthetic(config.vocab_size)?)
        } else {
            let tokenizer = args.tokenizer.clone().unwrap_or_else(|| args.model.clone());
            Some(vocab_from_tokenizer(&tokenizer, config.vocab_size)?)
        }
    } else {
        if args.tokenizer.is_some() || args.synthetic_vocab {
            return Err(
                "--tokenizer and --synthetic-vocab apply to a model folder; a GGUF model carries its own vocabulary"
                    .into(),
            );
        }
        None
    };
    let request = QuantizeRequest {
        model: args.model,
        target: args.ty.into(),
        vocab,
        name: args.name,
        out: args.out,
        force: args.force,
        threads: compute_threads(threads_flag),
    };
    run_job(args.quiet, |control| run_quantize(&request, control))
}
