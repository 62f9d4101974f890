//! Reading Hugging Face LLaMA model folders: `config.json`, safetensors (single or
//! sharded) and PyTorch `.bin` checkpoints (single or sharded), safely.
//!
//! Also writes them: sharded safetensors streamed in bounded memory ([`ShardedWriter`]), into a
//! temporary folder renamed into place when complete ([`StagedDir`]), for apply-delta /
//! make-delta ([`run_delta`]) and synthetic models of real shapes ([`run_synth`]).
//!
//! Nothing here trusts the files: safetensors headers are checked against the file,
//! PyTorch pickles run in a restricted VM that executes nothing and refuses every global
//! outside a small allow-list, and every error is one line naming the file and the fix.

mod checkpoint;
mod config;
mod delta;
mod dtype;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod gguf;
pub mod hub;
mod output;
mod pickle;
mod quantize;
mod safetensors;
mod safetensors_writer;
mod synth;
mod zip;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use config::LlamaConfig;
pub use delta::{combine, plan_delta, run_delta, DeltaOp, DeltaRequest, PlannedTensor, TOKENIZER_FILES};
pub use dtype::{extend_f32_from_le_bytes, to_f32_vec, DType};
pub use error::{Error, Result};
pub use gguf::{
    llama_file_type, GgmlType, GgufFile, GgufTensor, GgufTensorPlan, GgufValue, GgufValueType, GgufVocab, GgufWriter,
    DEFAULT_ALIGNMENT, TOKEN_TYPE_USER_DEFINED,
};
pub use output::StagedFile;
pub use output::{JobControl, Manifest, NoProgress, Progress, StagedDir};
pub use quantize::{
    gguf_tensor_name, permute_rows_for_gguf, run_quantize, run_synth_gguf, tensor_type, unpermute_rows_from_gguf,
    QuantizeRequest, QuantizeTarget,
};
pub use safetensors_writer::{ShardedWriter, ShardsWritten, TensorSpec, WrittenFile, INDEX_FILE};
pub use synth::{run_synth, SynthRequest, SynthShape};
