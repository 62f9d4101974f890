//! Where inference models come from: a GGUF file (memory-mapped, used in place) or a Hugging Face folder
//! (converted once into GGUF-named f32 tensors in memory).

use std::path::Path;
use std::sync::Arc;

use vicuna_kernels::GgmlType;
use vicuna_weights::{gguf_tensor_name, permute_rows_for_gguf, Checkpoint, GgufFile, LlamaConfig};

use super::{OwnedTensors, QuantLlama, TensorRef, TensorSource};
use crate::{Error, Result};

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        GgufFile::tensor(self, name).map(|t| TensorRef { ty: t.ty, dims: t.dims, data: t.data })
    }

    fn release(&self, data: &[u8]) {
        // A hint: if the pages cannot be given back, they stay mapped and nothing else changes.
        let _ = GgufFile::release(self, data);
    }
}

impl OwnedTensors {
    /// The tensors of a Hugging Face LLaMA folder under their GGUF names, widened to f32 (the compute type of a
    /// float model here, as in transformers on CPU), with the q and k rows in GGUF's interleaved RoPE order: what
    /// `vicuna quantize --type f32` would write, without the file. Checks the folder against `config` first.
    pub fn from_checkpoint(config: &LlamaConfig, checkpoint: &Checkpoint) -> Result<OwnedTensors> {
        checkpoint.check_against(config)?;
        let mut tensors = OwnedTensors::new();
        for name in checkpoint.names() {
            let Some(gguf_name) = gguf_tensor_name(name) else { continue };
            // A tied model may carry an lm_head copy; the native model reads token_embd in its place.
            if config.tie_word_embeddings && gguf_name == "output.weight" {
                continue;
            }
            let shape = &checkpoint.info(name).expect("listed by names()").shape;
            let mut values = checkpoint.to_f32(name)?;
            if gguf_name.ends_with("attn_q.weight") || gguf_name.ends_with("attn_k.weight") {
                values = permute_rows_for_gguf(&values, shape[1], config.head_dim);
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.insert(gguf_name, GgmlType::F32, shape.iter().rev().copied().collect(), bytes);
        }
        Ok(tensors)
    }
}

impl QuantLlama {
    /// Loads a model for inference from `path`: a `.gguf` file (any tensor types the kernels know, used in place
    /// from the memory map) or a Hugging Face folder (config.json plus safetensors or PyTorch .bin weights, held
    /// in f32), computing on `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<QuantLlama> {
        if path.is_dir() {
            let config = LlamaConfig::from_dir(path)?;
            let checkpoint = Checkpoint::open(path)?;
            let tensors = OwnedTensors::from_checkpoint(&config, &checkpoint)?;
            return QuantLlama::new(config, Arc::new(tensors), threads);
        }
        if !path.is_file() {
            return Err(Error::msg(format!(
                "{}: no such file or folder; give a Hugging Face model folder or a .gguf file",
                path.display()
            )));
        }
        QuantLlama::from_gguf(GgufFile::open(path)?, threads)
    }

    /// A model whose weights are the tensors of an opened GGUF file, used in place.
    pub fn from_gguf(file: GgufFile, threads: usize) -> Result<QuantLlama> {
        let config = file.llama_config()?;
        let path = file.path().to_owned();
        QuantLlama::new(config, Arc::new(file), threads).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
    }
}
