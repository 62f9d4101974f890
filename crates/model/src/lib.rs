//! The LLaMA model, twice: [`QuantLlama`] ([`native`]), the inference model behind `generate`, `score`, `chat`
//! and `serve`, on GGUF tensors (quantized or float, from a GGUF file or a converted Hugging Face folder) with
//! this workspace's kernels; and [`Llama`], the same forward pass on candle tensors, which has gradients: the
//! training code builds on it, and tests use it as a second reference.

mod fused;
mod linear;
mod llama;
pub mod native;

use std::fmt;
use std::path::Path;

use candle_core::{Device, Tensor};
use vicuna_weights::Checkpoint;

pub use candle_core;
pub use fused::{causal_attention, f32_slice, rms_norm, rotary, swiglu, with_f32};
pub use linear::linear;
pub use llama::{softmax, KvCache, Layer, Llama};
pub use native::{KvPool, PrefixCache, QuantCache, QuantLlama, Reservation, BLOCK_TOKENS};
pub use vicuna_weights::LlamaConfig;

/// A model error: bad weights, bad input, or a tensor failure. One line, meant for the user.
#[derive(Debug)]
pub enum Error {
    Weights(vicuna_weights::Error),
    Tensor(candle_core::Error),
    /// A kernel refused its operands (shapes, types).
    Kernel(vicuna_kernels::Error),
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error::Input(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Weights(e) => write!(f, "{e}"),
            Error::Tensor(e) => write!(f, "tensor error: {e}"),
            Error::Kernel(e) => write!(f, "kernel error: {e}"),
            Error::Input(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<vicuna_weights::Error> for Error {
    fn from(e: vicuna_weights::Error) -> Self {
        Error::Weights(e)
    }
}

impl From<vicuna_kernels::Error> for Error {
    fn from(e: vicuna_kernels::Error) -> Self {
        Error::Kernel(e)
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(e)
    }
}

/// Every id must index the embedding table (of `vocab_size` rows); a bad id is the caller's input error.
pub(crate) fn check_ids(ids: &[u32], vocab_size: usize) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::msg("no input tokens: give at least one token id"));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(Error::msg(format!("token id {bad} is outside the vocabulary (0..{vocab_size})")));
    }
    Ok(())
}

impl Llama {
    /// Load a Hugging Face model folder: `config.json` plus weights in any format the checkpoint
    /// reader knows. Weights are upcast to f32 (the compute type on CPU).
    pub fn load(dir: &Path, device: &Device) -> Result<Llama> {
        let config = LlamaConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(&config, &checkpoint, device)
    }

    pub fn from_checkpoint(config: &LlamaConfig, checkpoint: &Checkpoint, device: &Device) -> Result<Llama> {
        // All shape problems at once, before anything is converted.
        checkpoint.check_against(config)?;
        Llama::new(config, device, |name, shape| {
            let data = checkpoint.to_f32(name)?;
            Ok(Tensor::from_vec(data, shape, device)?)
        })
    }
}
