//! GGUF, llama.cpp's single-file model format: reading ([`GgufFile`], memory-mapped, distrusting every
//! byte) and writing ([`GgufWriter`], streamed, into a file that appears only when complete).
//!
//! Layout (little-endian, version 2 and 3): magic `GGUF`, version u32, tensor count u64, metadata
//! count u64; the metadata key/value pairs; one info per tensor (name, dims in ggml order, type,
//! offset); padding to `general.alignment` (32 unless set); then the tensor data, each tensor at an
//! aligned offset from the start of the data section.

mod read;
mod vocab;
mod write;

pub use read::{GgufFile, GgufTensor};
pub use vicuna_kernels::GgmlType;
pub use vocab::{GgufVocab, TOKEN_TYPE_USER_DEFINED};
pub use write::{GgufTensorPlan, GgufWriter};

/// The 4 bytes every GGUF file starts with.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";
/// The version this crate writes.
pub(crate) const VERSION: u32 = 3;
/// Alignment of the data section and of every tensor in it when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// llama.cpp's `GGML_MAX_DIMS`: a tensor has at most this many dimensions.
pub(crate) const MAX_DIMS: usize = 4;

/// The type tag of a metadata value, numbered as in the GGUF specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        use GgufValueType::*;
        [U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64].into_iter().find(|t| *t as u32 == id)
    }

    /// The specification's lowercase name, for messages.
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "uint8",
            I8 => "int8",
            U16 => "uint16",
            I16 => "int16",
            U32 => "uint32",
            I32 => "int32",
            F32 => "float32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "uint64",
            I64 => "int64",
            F64 => "float64",
        }
    }

    /// The fewest bytes one value of this type takes in a file: what bounds an element count
    /// read from the file before anything is allocated for it.
    pub(crate) fn min_encoded_len(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8, // a string is at least its u64 length
            Array => 12,                   // element type u32 + count u64
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// The element type is kept so that an empty array writes back as it was read.
    Array(GgufValueType, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(..) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// An integer of any width, if it is one (negative ones included).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v as i128,
            GgufValue::I8(v) => v as i128,
            GgufValue::U16(v) => v as i128,
            GgufValue::I16(v) => v as i128,
            GgufValue::U32(v) => v as i128,
            GgufValue::I32(v) => v as i128,
            GgufValue::U64(v) => v as i128,
            GgufValue::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// A float (f32 widened) or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A short description for messages: the type, and the value when it is short.
    pub(crate) fn describe(&self) -> String {
        match self {
            GgufValue::Array(ty, items) => format!("an array of {} {}", items.len(), ty.name()),
            GgufValue::String(s) if s.chars().count() > 40 => "a long string".to_string(),
            GgufValue::String(s) => format!("the string {s:?}"),
            other => format!("{} {:?}", other.value_type().name(), other).replace(['(', ')'], " "),
        }
    }
}

/// llama.cpp's `general.file_type` numbering (`enum llama_ftype`) for the types vicuna writes.
pub fn llama_file_type(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

/// Bytes of a tensor of `ty` with ggml dims `dims` (dims[0] the row length), or a reason why none:
/// a row that is not a whole number of blocks, or a size past `usize`.
pub(crate) fn tensor_bytes(ty: GgmlType, dims: &[usize]) -> std::result::Result<usize, String> {
    let row_len = dims.first().copied().unwrap_or(1);
    if row_len % ty.block_size() != 0 {
        return Err(format!("rows of {row_len} elements are not a whole number of {ty} blocks of {}", ty.block_size()));
    }
    // Checked here rather than by `row_size`, which trusts its argument not to overflow.
    let row =
        (row_len / ty.block_size()).checked_mul(ty.block_bytes()).ok_or_else(|| format!("dims {dims:?} overflow"))?;
    dims.iter().skip(1).try_fold(row, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("dims {dims:?} overflow"))
}
