//! Tensor element types as ggml and GGUF number them, their block geometry, and this crate's error type.

use std::fmt;

/// Elements per k-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;
/// Elements per block of the "legacy" formats q4_0, q4_1, q5_0, q5_1, q8_0 (ggml's `QK4_0` … `QK8_0`).
pub const QK: usize = 32;

/// A tensor element type, with the id that ggml's `enum ggml_type` and the GGUF tensor-info table use.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    BF16 = 30,
}

impl GgmlType {
    /// Every type this crate knows, in id order.
    pub const ALL: [GgmlType; 14] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
    ];

    /// The type with ggml id `id`, or `None` for ids this crate does not handle (the i-quants, ternary types …).
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|ty| ty.id() == id)
    }

    /// ggml's numeric id (what GGUF stores).
    pub fn id(self) -> u32 {
        self as u32
    }

    /// ggml's lowercase name (`ggml_type_name`), e.g. `"q4_K"`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q2_K => "q2_K",
            GgmlType::Q3_K => "q3_K",
            GgmlType::Q4_K => "q4_K",
            GgmlType::Q5_K => "q5_K",
            GgmlType::Q6_K => "q6_K",
            GgmlType::Q8_K => "q8_K",
            GgmlType::BF16 => "bf16",
        }
    }

    /// Elements per block (ggml's `blck_size`): 1 for the float types.
    pub const fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`); equal to `size_of` of the matching `Block*` struct.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    /// Whether elements are stored in blocks with shared scales (every type but f32, f16, bf16).
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes taken by `n` consecutive elements of type `ty` (ggml's `ggml_row_size`).
///
/// `n` must be a whole number of blocks: a row never ends inside a block.
pub fn row_size(ty: GgmlType, n: usize) -> Result<usize> {
    if !n.is_multiple_of(ty.block_size()) {
        return Err(Error::PartialBlock { ty, len: n });
    }
    Ok(n / ty.block_size() * ty.block_bytes())
}

/// What can go wrong when calling into this crate. Every variant names the offending sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// `len` elements do not make a whole number of `ty` blocks.
    PartialBlock { ty: GgmlType, len: usize },
    /// `bytes` bytes are not a whole number of `ty` blocks.
    RaggedBytes { ty: GgmlType, bytes: usize },
    /// A buffer does not have the length the shapes call for.
    Length { what: &'static str, expected: usize, actual: usize },
    /// A byte buffer that must be viewed as blocks is not aligned for them.
    Misaligned { what: &'static str, align: usize },
    /// The operation is not implemented for this type (e.g. quantizing to q2_K).
    Unsupported { op: &'static str, ty: GgmlType },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::PartialBlock { ty, len } => {
                write!(f, "{len} elements are not a whole number of {ty} blocks of {}", ty.block_size())
            }
            Error::RaggedBytes { ty, bytes } => {
                write!(f, "{bytes} bytes are not a whole number of {ty} blocks of {} bytes", ty.block_bytes())
            }
            Error::Length { what, expected, actual } => {
                write!(f, "{what} has length {actual}, expected {expected}")
            }
            Error::Misaligned { what, align } => write!(f, "{what} is not aligned to {align} bytes"),
            Error::Unsupported { op, ty } => write!(f, "{op} is not available for {ty}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Checks that a buffer has the length the shapes call for.
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Length { what, expected, actual })
    }
}
