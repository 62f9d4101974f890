//! Entry points for the fuzz targets in `fuzz/` (not part of the supported API): each runs one of
//! this crate's parsers over bytes held in memory, through the same code the file readers run once
//! a file is mapped, and returns what that parser found in a form the target can check.

use crate::checkpoint::{self, Layout};
use crate::error::Result;
use crate::{pickle, safetensors, zip};
use std::ops::Range;
use std::path::Path;

/// What the fuzz targets name the input in messages.
const INPUT: &str = "fuzz-input";

/// One tensor a weight-file parser accepted.
#[derive(Debug)]
pub struct FoundTensor {
    pub name: String,
    /// Bytes per element (of a dtype vicuna reads).
    pub elem_size: usize,
    pub shape: Vec<usize>,
    /// Where its bytes lie in the input: the tensor itself, or for a strided view the storage it views.
    pub data: Range<usize>,
    /// For a strided view: its element offset and strides in the storage (`None`: contiguous).
    pub view: Option<(usize, Vec<usize>)>,
}

/// The safetensors header of a whole file's `bytes`, as [`crate::Checkpoint`] reads it.
pub fn safetensors(bytes: &[u8]) -> Result<Vec<FoundTensor>> {
    let entries = safetensors::read_entries(bytes, Path::new(INPUT), checkpoint::is_ignored)?;
    Ok(entries
        .into_iter()
        .map(|e| FoundTensor {
            name: e.name,
            elem_size: e.dtype.size_in_bytes(),
            shape: e.shape,
            data: e.data,
            view: None,
        })
        .collect())
}

/// The entries of a zip archive (a PyTorch `.bin`): (name, byte range in `bytes`).
pub fn zip_entries(bytes: &[u8]) -> Result<Vec<(String, Range<usize>)>> {
    Ok(zip::read_entries(bytes, Path::new(INPUT))?.into_iter().map(|e| (e.name, e.data)).collect())
}

/// One tensor of a state dict as the unpickler built it (sizes and strides count elements).
#[derive(Debug)]
pub struct PickledTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    /// Elements of the storage it views.
    pub storage_numel: u64,
}

/// A `data.pkl` run through the restricted unpickler.
pub fn pickle_state_dict(pickle: &[u8]) -> Result<Vec<PickledTensor>> {
    Ok(pickle::load_state_dict(pickle, Path::new(INPUT))?
        .into_iter()
        .map(|(name, t)| PickledTensor { name, shape: t.shape, stride: t.stride, storage_numel: t.storage.numel })
        .collect())
}

/// A whole PyTorch zip checkpoint (zip reader, restricted unpickler, storage checks), as
/// [`crate::Checkpoint`] reads a `.bin`.
pub fn pytorch(bytes: &[u8]) -> Result<Vec<FoundTensor>> {
    Ok(checkpoint::read_pytorch(bytes, Path::new(INPUT))?
        .into_iter()
        .map(|(name, dtype, shape, layout)| {
            let (data, view) = match layout {
                Layout::Contiguous(range) => (range, None),
                Layout::Strided { storage, offset, stride } => (storage, Some((offset, stride))),
            };
            FoundTensor { name, elem_size: dtype.size_in_bytes(), shape, data, view }
        })
        .collect())
}

/// Copies the elements of a strided view out of its storage, as [`crate::Checkpoint::bytes`] does.
pub fn gather_view(bytes: &[u8], tensor: &FoundTensor) -> Vec<u8> {
    let (offset, stride) = tensor.view.as_ref().expect("a strided view");
    let numel: usize = tensor.shape.iter().product();
    let mut out = vec![0u8; numel * tensor.elem_size];
    checkpoint::gather(
        &bytes[tensor.data.clone()],
        tensor.elem_size,
        *offset,
        &tensor.shape,
        stride,
        0..numel,
        &mut out,
    );
    out
}
