//! Writing GGUF v3 as a stream: the header (metadata and every tensor's info) goes out first, since
//! every tensor's type and shape are known from the plan, then the tensor data in whatever chunks
//! the caller produces, each tensor padded to the alignment. Nothing is held in memory but the
//! chunk at hand.

use super::{tensor_bytes, GgmlType, GgufValue, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, VERSION};
use crate::error::{bail, Error, Result};
use crate::output::StreamWriter;
use crate::safetensors_writer::{HashedFile, WrittenFile};
use std::collections::HashSet;
use std::path::Path;

/// A tensor to write: its GGUF name, type, and dims in ggml order (`dims[0]` the row length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorPlan {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<usize>,
}

impl GgufTensorPlan {
    /// Bytes of the tensor's data (without padding). The plan was checked by [`GgufWriter::create`].
    pub fn byte_len(&self) -> usize {
        tensor_bytes(self.ty, &self.dims).expect("checked when the writer was created")
    }
}

/// llama.cpp's `GGML_MAX_NAME` is 64 bytes with the terminating zero.
const MAX_TENSOR_NAME: usize = 63;

/// Streams one GGUF file; see the module documentation.
pub struct GgufWriter {
    file: HashedFile,
    tensors: Vec<GgufTensorPlan>,
    /// The tensor being written and how many of its bytes are still due.
    tensor: usize,
    tensor_left: usize,
}

impl GgufWriter {
    /// Creates `dir/name` and writes the header. Tensors are written in the order given.
    pub fn create(
        dir: &Path,
        name: &str,
        metadata: &[(String, GgufValue)],
        tensors: Vec<GgufTensorPlan>,
    ) -> Result<Self> {
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        let mut keys = HashSet::new();
        for (key, value) in metadata {
            if !keys.insert(key.as_str()) {
                bail!("internal error: metadata key {key} given twice for {name}");
            }
            if key == "general.alignment" && *value != GgufValue::U32(DEFAULT_ALIGNMENT as u32) {
                bail!("internal error: only the default alignment {DEFAULT_ALIGNMENT} is written");
            }
            put_string(&mut header, key);
            header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut header, value)?;
        }
        let mut names = HashSet::new();
        let mut offset = 0usize;
        for t in &tensors {
            if t.name.len() > MAX_TENSOR_NAME || !names.insert(t.name.as_str()) {
                bail!("internal error: tensor name {:?} is too long for GGUF or given twice", t.name);
            }
            if t.dims.is_empty() || t.dims.len() > MAX_DIMS {
                bail!("internal error: tensor {} has {} dimensions (1 to {MAX_DIMS} allowed)", t.name, t.dims.len());
            }
            let len = tensor_bytes(t.ty, &t.dims)
                .map_err(|why| Error::new(format!("cannot write tensor {} as {}: {why}", t.name, t.ty)))?;
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + len).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        header.resize(header.len().next_multiple_of(DEFAULT_ALIGNMENT), 0);
        let mut file = HashedFile::create(dir, name)?;
        file.write(&header, None)?;
        let mut writer = GgufWriter { file, tensors, tensor: 0, tensor_left: 0 };
        writer.start_tensor()?;
        Ok(writer)
    }

    /// Appends the next bytes of tensor data; chunks may run from one tensor into the next.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            if self.tensor == self.tensors.len() {
                bail!("internal error: {} more bytes than the tensors hold were written", bytes.len());
            }
            let take = bytes.len().min(self.tensor_left);
            let (now, rest) = bytes.split_at(take);
            self.file.write(now, None)?;
            self.tensor_left -= take;
            bytes = rest;
            if self.tensor_left == 0 {
                self.tensor += 1;
                self.start_tensor()?;
            }
        }
        Ok(())
    }

    /// Checks that every tensor was written, syncs the file, and reports its size and checksum.
    pub fn finish(self) -> Result<WrittenFile> {
        if self.tensor < self.tensors.len() {
            bail!(
                "internal error: the data of tensor {} and {} more are missing",
                self.tensors[self.tensor].name,
                self.tensors.len() - self.tensor - 1
            );
        }
        self.file.close()
    }

    /// Pads to the alignment after the tensor just finished and moves on, passing over empty tensors.
    fn start_tensor(&mut self) -> Result<()> {
        loop {
            let pad = (self.file.len() as usize).next_multiple_of(DEFAULT_ALIGNMENT) - self.file.len() as usize;
            if pad > 0 {
                self.file.write(&[0u8; DEFAULT_ALIGNMENT][..pad], None)?;
            }
            if self.tensor == self.tensors.len() {
                return Ok(());
            }
            self.tensor_left = self.tensors[self.tensor].byte_len();
            if self.tensor_left > 0 {
                return Ok(());
            }
            self.tensor += 1;
        }
    }
}

impl StreamWriter for GgufWriter {
    type Written = WrittenFile;
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        GgufWriter::write(self, bytes)
    }
    fn finish(self) -> Result<WrittenFile> {
        GgufWriter::finish(self)
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) -> Result<()> {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.push(*v as u8),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(*v as u8),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(ty, items) => {
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                if item.value_type() != *ty {
                    bail!("internal error: an array of {} holds {}", ty.name(), item.describe());
                }
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}
