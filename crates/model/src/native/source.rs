//! Where the native model's weights come from: anything that can hand out a tensor's bytes by GGUF name.

use std::collections::HashMap;

use vicuna_kernels::GgmlType;

/// A tensor as stored in a GGUF file, borrowed from its owner (a memory map, or memory).
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    pub ty: GgmlType,
    /// ggml order: `dims[0]` is the row length (the fastest-varying dimension), `dims[1]` the number of rows.
    pub dims: Vec<usize>,
    /// The rows one after the other, `row_size(ty, dims[0]) * dims[1..].product()` bytes.
    pub data: &'a [u8],
}

/// Tensors by GGUF name (`token_embd.weight`, `blk.0.attn_q.weight`, …). The model borrows the bytes it is handed
/// for the duration of each step; it copies a weight matrix only to rewrite it in the kernels' own layout, and
/// then calls [`TensorSource::release`] on the original.
pub trait TensorSource: Send + Sync {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>>;

    /// Called when the model has made its own copy of tensor bytes `data` (a matrix rewritten in the kernels'
    /// layout) and will not read them again: a memory-mapped source gives those pages back, so the weights are not
    /// held twice. Only a hint; the bytes stay readable.
    fn release(&self, _data: &[u8]) {}
}

/// Tensors held in memory: synthetic models, tests, and sources built by conversion.
#[derive(Default)]
pub struct OwnedTensors {
    tensors: HashMap<String, (GgmlType, Vec<usize>, Vec<u8>)>,
}

impl OwnedTensors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor; its shape is checked by the model that uses it, not here.
    pub fn insert(&mut self, name: impl Into<String>, ty: GgmlType, dims: Vec<usize>, data: Vec<u8>) {
        self.tensors.insert(name.into(), (ty, dims, data));
    }

    pub fn remove(&mut self, name: &str) -> Option<(GgmlType, Vec<usize>, Vec<u8>)> {
        self.tensors.remove(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Bytes of tensor data held.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|(_, _, data)| data.len()).sum()
    }
}

impl TensorSource for OwnedTensors {
    fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        self.tensors.get(name).map(|(ty, dims, data)| TensorRef { ty: *ty, dims: dims.clone(), data })
    }
}
