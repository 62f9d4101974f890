//! Reading GGUF files: memory-mapped, every count, length, dimension, type and offset checked against
//! the file before it is used, so a damaged or hostile file gives a one-line error, never a panic or
//! an allocation larger than the file.

use super::{tensor_bytes, GgmlType, GgufValue, GgufValueType, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::config::LlamaConfig;
use crate::error::{bail, Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Nesting depth of arrays of arrays accepted: deep enough for any real file, shallow enough that a
/// file cannot exhaust the stack.
const MAX_ARRAY_NESTING: usize = 8;

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Backing,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorEntry>,
    tensor_index: HashMap<String, usize>,
    alignment: usize,
    data_offset: usize,
}

/// The bytes of the file: memory-mapped when opened, owned when handed over ([`GgufFile::from_bytes`]).
enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(map) => map,
            Backing::Owned(bytes) => bytes,
        }
    }
}

struct TensorEntry {
    name: String,
    ty: GgmlType,
    dims: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    len: usize,
}

/// One tensor, its data borrowed from the file's memory map.
#[derive(Clone, Debug)]
pub struct GgufTensor<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    /// ggml order: `dims[0]` is the row length (the fastest-varying dimension).
    pub dims: Vec<usize>,
    pub data: &'a [u8],
}

impl GgufTensor<'_> {
    /// Number of rows (product of every dimension but the first).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and checks a GGUF file; tensor data stays in the file until read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::new(format!("cannot open {}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| Error::new(format!("cannot stat {}: {e}", path.display())))?.len();
        check_header_room(path, len)?;
        // SAFETY: the map is read-only; like every reader of model files we rely on nobody truncating
        // the file while it is open (the same assumption llama.cpp and safetensors make).
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::new(format!("cannot memory-map {}: {e}", path.display())))?;
        GgufFile::parse(path, Backing::Map(map))
    }

    /// Reads a GGUF file already in memory (`path` names it in messages), checked exactly as
    /// [`GgufFile::open`] checks a file.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<GgufFile> {
        check_header_room(path, bytes.len() as u64)?;
        GgufFile::parse(path, Backing::Owned(bytes))
    }

    fn parse(path: &Path, map: Backing) -> Result<GgufFile> {
        let shown = path.display().to_string();
        let mut r = Reader { bytes: &map, pos: 0, file: &shown };
        if r.take(4, "the magic number")? != MAGIC {
            bail!("{shown} is not a GGUF file (it does not start with \"GGUF\"); pass a .gguf model file");
        }
        let version = r.u32("the version")?;
        match version {
            2 | 3 => {}
            1 => bail!("{shown} is GGUF version 1, which is not supported; convert it again with a current llama.cpp"),
            v if v.swap_bytes() <= 3 => {
                bail!("{shown} is a big-endian GGUF file, which is not supported; use a little-endian one")
            }
            v => bail!("{shown} has GGUF version {v}; versions 2 and 3 are supported"),
        }
        let tensor_count = r.u64("the tensor count")?;
        let metadata_count = r.u64("the metadata count")?;
        // Each metadata pair takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor info at
        // least 8 + 4 + 4 + 8: counts beyond what the file can hold are refused before any allocation.
        if metadata_count > (r.remaining() / 13) as u64 {
            bail!("{shown} is truncated or damaged: it claims {metadata_count} metadata entries, more than its size allows");
        }
        if tensor_count > (r.remaining() / 24) as u64 {
            bail!("{shown} is truncated or damaged: it claims {tensor_count} tensors, more than its size allows");
        }
        // Counts are checked against the file's size, but an entry in memory is larger than its
        // smallest encoding: lists grow with what is actually parsed instead of being sized from the
        // file's claims.
        let mut metadata = Vec::with_capacity(capacity_hint(metadata_count));
        let mut metadata_index = HashMap::new();
        for i in 0..metadata_count {
            let key = r.string(&format!("the key of metadata entry {i}"))?;
            let ty = r.value_type(&format!("metadata {key}"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                bail!("{shown} is damaged: metadata key {key} appears twice");
            }
            metadata.push((key, value));
        }
        let alignment = match metadata_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
            Some(other) => bail!(
                "{shown}: general.alignment must be a uint32 power of two, found {}; the file is damaged",
                other.describe()
            ),
        };

        struct RawInfo {
            name: String,
            ty: GgmlType,
            dims: Vec<usize>,
            offset: u64,
        }
        let mut infos = Vec::with_capacity(capacity_hint(tensor_count));
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the dimension count of tensor {name}"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!("{shown} is damaged: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)");
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&format!("the dimensions of tensor {name}"))?;
                // ggml holds dimensions as int64.
                let d = usize::try_from(d).ok().filter(|&d| d as u64 <= i64::MAX as u64).ok_or_else(|| {
                    Error::new(format!("{shown} is damaged: tensor {name} has an impossible dimension {d}"))
                })?;
                dims.push(d);
            }
            let type_id = r.u32(&format!("the type of tensor {name}"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::new(format!(
                    "{shown}: tensor {name} has ggml type {} which vicuna does not read; \
                     requantize the model to one of f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_K..q6_K",
                    ggml_type_name(type_id)
                ))
            })?;
            let offset = r.u64(&format!("the offset of tensor {name}"))?;
            infos.push(RawInfo { name, ty, dims, offset });
        }
        let data_offset = r
            .pos
            .checked_next_multiple_of(alignment)
            .filter(|&o| o <= map.len())
            .ok_or_else(|| Error::new(format!("{shown} is truncated: it ends before its tensor data section")))?;

        let mut tensors = Vec::with_capacity(infos.len());
        let mut tensor_index = HashMap::new();
        for info in infos {
            let name = info.name;
            let len = tensor_bytes(info.ty, &info.dims)
                .map_err(|why| Error::new(format!("{shown} is damaged: tensor {name} ({}): {why}", info.ty)))?;
            if info.offset % alignment as u64 != 0 {
                bail!(
                    "{shown} is damaged: tensor {name} starts at offset {} which is not a multiple of the alignment {alignment}",
                    info.offset
                );
            }
            let start = usize::try_from(info.offset).ok().and_then(|o| o.checked_add(data_offset));
            let range = start.and_then(|s| s.checked_add(len).map(|e| (s, e))).filter(|&(_, e)| e <= map.len());
            let Some((start, _)) = range else {
                bail!(
                    "{shown} is truncated or damaged: tensor {name} ({} bytes at data offset {}) lies past the end of the {}-byte file",
                    len,
                    info.offset,
                    map.len()
                );
            };
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                bail!("{shown} is damaged: tensor {name} appears twice");
            }
            tensors.push(TensorEntry { name, ty: info.ty, dims: info.dims, start, len });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Where the tensor data section starts in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Every metadata pair, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GgufValue) -> Error {
        Error::new(format!(
            "{}: metadata {key} must be {expected}, found {}; the file was written by a tool vicuna does not understand",
            self.path.display(),
            found.describe()
        ))
    }

    /// A string value; `Ok(None)` when the key is absent.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))).transpose()
    }

    /// A non-negative integer of any integer type that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|i| usize::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// A token id: a non-negative integer below 2^32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "an integer from 0 to 4294967295", v))
            })
            .transpose()
    }

    /// A number (float or integer), as f64.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))).transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))).transpose()
    }

    /// An array's elements (any element type).
    pub fn get_array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        self.get(key)
            .map(|v| match v {
                GgufValue::Array(_, items) => Ok(items.as_slice()),
                other => Err(self.wrong_type(key, "an array", other)),
            })
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| {
            Error::new(format!(
                "{}: metadata {key} is missing; the file is not a complete LLaMA GGUF",
                self.path.display()
            ))
        })
    }

    /// Drops this process's pages of `data` (a slice of this file's tensor data, e.g. rows just
    /// converted), so that streaming through a model does not leave the whole file resident. Only a
    /// hint about memory: the slices stay valid and are read from the file again if touched.
    pub fn release(&self, data: &[u8]) -> Result<()> {
        let Backing::Map(map) = &self.map else {
            return Ok(()); // owned bytes: nothing to give back to a file
        };
        let start = (data.as_ptr() as usize).wrapping_sub(map.as_ptr() as usize);
        if data.is_empty() || start >= map.len() || data.len() > map.len() - start {
            return Ok(()); // not ours: nothing to release
        }
        // SAFETY: the map is a read-only file mapping that nothing writes through, so its pages only
        // ever hold the file's bytes: dropping them loses nothing, and any later access re-reads them.
        unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, data.len()) }
            .map_err(|e| Error::new(format!("cannot release pages of {}: {e}", self.path.display())))
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = GgufTensor<'_>> {
        self.tensors.iter().map(|t| self.view(t))
    }

    pub fn tensor(&self, name: &str) -> Option<GgufTensor<'_>> {
        self.tensor_index.get(name).map(|&i| self.view(&self.tensors[i]))
    }

    fn view<'a>(&'a self, t: &'a TensorEntry) -> GgufTensor<'a> {
        GgufTensor { name: &t.name, ty: t.ty, dims: t.dims.clone(), data: &self.map[t.start..t.start + t.len] }
    }

    /// The hyper-parameters of a `llama` GGUF as a [`LlamaConfig`] (transformers' names), checked like a
    /// `config.json`.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let shown = self.path.display();
        let arch = self.get_str("general.architecture")?;
        if arch != Some("llama") {
            bail!(
                "{shown}: general.architecture is {}, not llama; vicuna runs LLaMA models",
                arch.map(|a| format!("{a:?}")).unwrap_or_else(|| "missing".to_string())
            );
        }
        let blocks = self.required_usize("llama.block_count")?;
        // Every block has several tensors: a count past the file's tensors is damage, and must not
        // reach code that makes a list entry per block.
        if blocks > self.tensors.len() {
            bail!(
                "{shown}: llama.block_count is {blocks} but the file holds only {} tensors; the file is damaged",
                self.tensors.len()
            );
        }
        let hidden = self.required_usize("llama.embedding_length")?;
        let heads = self.required_usize("llama.attention.head_count")?;
        let kv_heads = self.get_usize("llama.attention.head_count_kv")?.unwrap_or(heads);
        let vocab = match self.get_usize("llama.vocab_size")? {
            Some(v) => v,
            None => match self.get_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => match self.tensor("token_embd.weight") {
                    Some(t) if t.dims.len() == 2 => t.dims[1],
                    _ => bail!("{shown}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size"),
                },
            },
        };
        let head_dim = match (heads > 0 && hidden % heads == 0, self.get_usize("llama.attention.key_length")?) {
            (_, Some(k)) => k,
            (true, None) => hidden / heads,
            (false, None) => {
                bail!("{shown}: llama.embedding_length {hidden} is not divisible by the head count {heads}")
            }
        };
        if let Some(rot) = self.get_usize("llama.rope.dimension_count")? {
            if rot != head_dim {
                bail!("{shown}: llama.rope.dimension_count {rot} differs from the head size {head_dim}; partial rotary embeddings are not supported");
            }
        }
        let rope_scaling = match self.get_str("llama.rope.scaling.type")? {
            None | Some("none") => Value::Null,
            Some(kind) => json!({ "type": kind, "factor": self.get_f64("llama.rope.scaling.factor")? }),
        };
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.required_usize("llama.feed_forward_length")?,
            "num_hidden_layers": blocks,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": self.get_usize("llama.context_length")?.unwrap_or(2048),
            "rms_norm_eps": self.get_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": self.get_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "rope_scaling": rope_scaling,
        });
        for (key, field) in
            [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")]
        {
            if let Some(id) = self.get_u32(key)? {
                config[field] = json!(id);
            }
        }
        LlamaConfig::from_json_value(&config, &format!("{shown} (llama.* metadata)"))
    }
}

/// A GGUF header alone is 24 bytes: anything shorter is refused before it is mapped.
fn check_header_room(path: &Path, len: u64) -> Result<()> {
    if len < 24 {
        bail!("{} is not a GGUF file: it is only {len} bytes long (a GGUF header alone is 24)", path.display());
    }
    Ok(())
}

/// ggml's names for type ids this crate does not handle, for messages.
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        4 | 5 => "q4_2/q4_3 (removed from ggml)",
        9 => "q8_1",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        _ => return format!("id {id} (unknown)"),
    };
    format!("{name} (id {id})")
}

/// A capacity to reserve for `count` entries claimed by the file: the count itself when small, else
/// a bound (the vector grows past it only as real entries are parsed).
fn capacity_hint(count: u64) -> usize {
    count.min(1 << 12) as usize
}

/// A bounds-checked cursor over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "{} is truncated or damaged: {what} ({n} bytes at offset {}) runs past the end of the file ({} bytes)",
                self.file,
                self.pos,
                self.bytes.len()
            );
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            bail!(
                "{} is truncated or damaged: {what} claims {len} bytes at offset {}, past the end of the file",
                self.file,
                self.pos
            );
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::new(format!("{} is damaged: {what} is not valid UTF-8", self.file)))
    }

    fn value_type(&mut self, what: &str) -> Result<GgufValueType> {
        let id = self.u32(what)?;
        GgufValueType::from_id(id).ok_or_else(|| {
            Error::new(format!("{} is damaged: {what} has value type {id}, which GGUF does not define", self.file))
        })
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("the value of metadata {key}");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(&what)?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(&what)?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            GgufValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("{} is damaged: metadata {key} is a bool stored as {b} (0 or 1 expected)", self.file),
            },
            GgufValueType::String => GgufValue::String(self.string(&what)?),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    bail!("{} is damaged: metadata {key} nests arrays more than {MAX_ARRAY_NESTING} deep", self.file);
                }
                let element = self.value_type(&format!("the element type of metadata {key}"))?;
                let count = self.u64(&format!("the length of metadata {key}"))?;
                if count > (self.remaining() / element.min_encoded_len()) as u64 {
                    bail!(
                        "{} is truncated or damaged: metadata {key} claims {count} {} elements, more than the rest of the file holds",
                        self.file,
                        element.name()
                    );
                }
                let mut items = Vec::with_capacity(capacity_hint(count));
                for _ in 0..count {
                    items.push(self.value(element, key, depth + 1)?);
                }
                GgufValue::Array(element, items)
            }
        })
    }
}
