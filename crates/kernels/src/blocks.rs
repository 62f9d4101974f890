//! The on-disk block layouts of ggml / GGUF, field for field (`ggml-common.h`).
//!
//! Every weight block is `#[repr(C)]` with byte-sized fields only (scales are [`Half`], two little-endian bytes), so
//! its alignment is 1 and a memory-mapped GGUF tensor can be viewed as blocks in place, wherever it starts.
//! [`BlockQ8K`] is the exception: it only ever holds activations this crate quantizes itself, so it keeps ggml's
//! native `f32`/`i16` fields.

use crate::types::{Error, GgmlType, Result, QK, QK_K};

/// An IEEE binary16 value stored as two little-endian bytes (ggml's `ggml_half`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct Half(pub [u8; 2]);

impl Half {
    pub const ZERO: Half = Half([0, 0]);

    /// The nearest half to `v`, ties to even (what ggml's `GGML_FP32_TO_FP16` does, with or without F16C).
    pub fn from_f32(v: f32) -> Half {
        Half(half::f16::from_f32(v).to_bits().to_le_bytes())
    }

    pub fn to_f32(self) -> f32 {
        half::f16::from_bits(self.bits()).to_f32()
    }

    pub fn bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }
}

/// A block layout that lives in GGUF tensor data.
///
/// # Safety
/// Implementors must be `#[repr(C)]` plain old data for which every bit pattern is valid, with
/// `size_of::<Self>() == TYPE.block_bytes()`.
pub unsafe trait Block: Copy + 'static {
    const TYPE: GgmlType;
}

/// Views `bytes` as a slice of blocks, in place.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> Result<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::RaggedBytes { ty: B::TYPE, bytes: bytes.len() });
    }
    if bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0 {
        return Err(Error::Misaligned { what: "block data", align: std::mem::align_of::<B>() });
    }
    // SAFETY: length and alignment were checked above; `Block` guarantees every bit pattern is a valid `B`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Views `bytes` as a mutable slice of blocks, in place.
pub fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> Result<&mut [B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::RaggedBytes { ty: B::TYPE, bytes: bytes.len() });
    }
    if bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0 {
        return Err(Error::Misaligned { what: "block data", align: std::mem::align_of::<B>() });
    }
    // SAFETY: as in `as_blocks`; the exclusive borrow of `bytes` moves to the result.
    Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size) })
}

/// Views blocks as their raw bytes (what a GGUF writer stores).
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `Block` types are plain old data without padding (their size is asserted against ggml's below).
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

/// 32 weights `d * (q - 8)`, q in 0..16. Byte `j` of `qs` holds element `j` in its low nibble and `j + 16` in its high.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: Half,
    pub qs: [u8; QK / 2],
}

/// 32 weights `d * q + m`, q in 0..16, nibbles as in [`BlockQ4_0`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: Half,
    pub m: Half,
    pub qs: [u8; QK / 2],
}

/// 32 weights `d * (q - 16)`, q in 0..32: low 4 bits as in [`BlockQ4_0`], bit 4 of element `j` is bit `j` of `qh`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: Half,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 weights `d * q + m`, q in 0..32, bits as in [`BlockQ5_0`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: Half,
    pub m: Half,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 weights `d * q`, q a signed byte.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: Half,
    pub qs: [i8; QK],
}

/// 256 weights in 16 groups of 16: `d * (scales[g] & 15) * q - dmin * (scales[g] >> 4)`, q in 0..4. Byte `l` of each
/// 32-byte quarter of `qs` holds, from its low bits up, the elements `l`, `l + 32`, `l + 64`, `l + 96` of a 128-element
/// half.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: Half,
    pub dmin: Half,
}

/// 256 weights in 16 groups of 16: `d * (s[g] - 32) * (q - 4 * !high)`, low 2 bits of q packed as in [`BlockQ2K`], the
/// third bit in `hmask` (bit `i / 32` of byte `i % 32`), the 6-bit group scales packed into `scales` (ggml's layout).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: Half,
}

/// 256 weights in 8 groups of 32: `d * sc[g] * q - dmin * m[g]`, q in 0..16, with 6-bit `sc`/`m` packed in
/// `scales` (see `unpack_scales_mins_k4`). Each 32-byte quarter of `qs` holds 64 elements: the low nibbles the
/// first 32, the high nibbles the next 32.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: Half,
    pub dmin: Half,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// As [`BlockQ4K`] with a fifth bit per element: bit `2 * (i / 64) + (i % 64) / 32` of `qh[i % 32]`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: Half,
    pub dmin: Half,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 256 weights in 16 groups of 16: `d * scales[g] * (q - 32)`, q in 0..64. Per 128-element half `h`, byte `l` of
/// `ql[64h..64h + 32]` holds the low 4 bits of elements `l` (low nibble) and `l + 64` (high nibble), byte `l` of
/// `ql[64h + 32..64h + 64]` those of `l + 32` and `l + 96`, and byte `l` of `qh[32h..32h + 32]` the top 2 bits of
/// elements `l`, `l + 32`, `l + 64`, `l + 96`, from its low bits up.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: Half,
}

/// 256 activations `d * q`, with the sums of each group of 16 `q`s (ggml's `block_q8_K`, the partner of the k-quants
/// in dot products).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

macro_rules! impl_block {
    ($($block:ty => $ty:expr),* $(,)?) => {$(
        // SAFETY: each struct is repr(C) over integer arrays and `Half`, any bit pattern is valid, and its size is
        // asserted against ggml's type size right here.
        unsafe impl Block for $block {
            const TYPE: GgmlType = $ty;
        }
        const _: () = assert!(std::mem::size_of::<$block>() == $ty.block_bytes());
    )*};
}

impl_block! {
    BlockQ4_0 => GgmlType::Q4_0,
    BlockQ4_1 => GgmlType::Q4_1,
    BlockQ5_0 => GgmlType::Q5_0,
    BlockQ5_1 => GgmlType::Q5_1,
    BlockQ8_0 => GgmlType::Q8_0,
    BlockQ2K => GgmlType::Q2_K,
    BlockQ3K => GgmlType::Q3_K,
    BlockQ4K => GgmlType::Q4_K,
    BlockQ5K => GgmlType::Q5_K,
    BlockQ6K => GgmlType::Q6_K,
    BlockQ8K => GgmlType::Q8_K,
}

// Byte alignment is what lets weight blocks be used in place inside a GGUF file.
const _: () = {
    assert!(std::mem::align_of::<BlockQ4_0>() == 1);
    assert!(std::mem::align_of::<BlockQ8_0>() == 1);
    assert!(std::mem::align_of::<BlockQ4K>() == 1);
    assert!(std::mem::align_of::<BlockQ6K>() == 1);
    assert!(std::mem::align_of::<BlockQ3K>() == 1);
};

/// The 6-bit scales and mins of groups `0..8` of a q4_K / q5_K block (ggml's `get_scale_min_k4`, all eight at once).
///
/// Bytes 0..4 hold the low 6 bits of scales 0..4, bytes 4..8 those of mins 0..4; bytes 8..12 hold the low 4 bits of
/// scale (low nibble) and min (high nibble) 4..8, whose top 2 bits sit in the top bits of bytes 0..4 and 4..8.
pub fn unpack_scales_mins_k4(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 63;
        mins[j] = packed[j + 4] & 63;
    }
    for j in 4..8 {
        scales[j] = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
    (scales, mins)
}

/// [`unpack_scales_mins_k4`] computed on whole words: the eight scales and the eight mins, each as the bytes of a
/// little-endian u64 (what the SIMD kernels load into a vector).
#[inline]
pub fn scales_mins_k4_words(packed: &[u8; 12]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    // Groups 0..4 are the low 6 bits of bytes 0..8; groups 4..8 take 4 bits from bytes 8..12 and their top two bits
    // from the top of bytes 0..8 (`>> 6` brings each byte's bits 6, 7 down to bits 0, 1 of the same byte).
    let scales_hi = (c & LOW4) | (((a >> 6) & TOP2) << 4);
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4);
    ((a & LOW6) as u64 | (scales_hi as u64) << 32, (b & LOW6) as u64 | (mins_hi as u64) << 32)
}

/// Inverse of [`unpack_scales_mins_k4`]; each value must be below 64.
pub fn pack_scales_mins_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    packed
}

/// The sixteen 6-bit scales of a q3_K block, each minus 32.
///
/// Bytes 0..8 hold the low 4 bits (scales 0..8 in the low nibbles, 8..16 in the high ones); bytes 8..12 hold the top
/// 2 bits, scale `j` at bit `2 * (j / 4)` of byte `8 + j % 4`.
pub fn unpack_scales_q3k(packed: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, s) in out.iter_mut().enumerate() {
        let low = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = ((low | (high << 4)) as i8) - 32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k4_scale_unpacking_agrees_bytewise_and_wordwise() {
        let mut state = 12345u32;
        for _ in 0..1000 {
            let packed: [u8; 12] = std::array::from_fn(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 24) as u8
            });
            let (scales, mins) = unpack_scales_mins_k4(&packed);
            let (scale_word, min_word) = scales_mins_k4_words(&packed);
            assert_eq!(scale_word.to_le_bytes(), scales);
            assert_eq!(min_word.to_le_bytes(), mins);
            if scales.iter().chain(&mins).all(|&v| v < 64) {
                assert_eq!(pack_scales_mins_k4(&scales, &mins), packed);
            }
        }
    }

    #[test]
    fn block_sizes_match_ggml() {
        for (size, ty) in [
            (std::mem::size_of::<BlockQ4_0>(), GgmlType::Q4_0),
            (std::mem::size_of::<BlockQ4_1>(), GgmlType::Q4_1),
            (std::mem::size_of::<BlockQ5_0>(), GgmlType::Q5_0),
            (std::mem::size_of::<BlockQ5_1>(), GgmlType::Q5_1),
            (std::mem::size_of::<BlockQ8_0>(), GgmlType::Q8_0),
            (std::mem::size_of::<BlockQ2K>(), GgmlType::Q2_K),
            (std::mem::size_of::<BlockQ3K>(), GgmlType::Q3_K),
            (std::mem::size_of::<BlockQ4K>(), GgmlType::Q4_K),
            (std::mem::size_of::<BlockQ5K>(), GgmlType::Q5_K),
            (std::mem::size_of::<BlockQ6K>(), GgmlType::Q6_K),
            (std::mem::size_of::<BlockQ8K>(), GgmlType::Q8_K),
        ] {
            assert_eq!(size, ty.block_bytes(), "{ty}");
        }
        // ggml's own numbers, spelled out.
        assert_eq!(
            [18, 20, 22, 24, 34, 84, 110, 144, 176, 210, 292],
            [
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
                GgmlType::Q8_K
            ]
            .map(|t| t.block_bytes())
        );
    }
}
