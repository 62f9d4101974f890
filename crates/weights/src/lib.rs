//! Reading Hugging Face LLaMA model folders: `config.json`, safetensors (single or
//! sharded) and PyTorch `.bin` checkpoints (single or sharded), safely.
//!
//! Nothing here trusts the files: safetensors headers are checked against the file,
//! PyTorch pickles run in a restricted VM that executes nothing and refuses every global
//! outside a small allow-list, and every error is one line naming the file and the fix.

mod checkpoint;
mod config;
mod dtype;
mod error;
mod pickle;
mod safetensors;
mod zip;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use config::LlamaConfig;
pub use dtype::{extend_f32_from_le_bytes, to_f32_vec, DType};
pub use error::{Error, Result};
