//! Element types vicuna reads, and the one place that widens them to f32.

use half::slice::HalfFloatSliceExt;
use half::{f16, slice::HalfBitsSliceExt};
use std::fmt;

/// The element types of tensors vicuna can read. LLaMA checkpoints in the wild are
/// float16 (the 2023 StableVicuna release), bfloat16 (Meta's newer uploads) or float32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors spelling ("F32", "F16", "BF16"), also used in messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The sentence every "unsupported dtype" message ends with.
pub(crate) const SUPPORTED_DTYPES: &str = "vicuna reads F32, F16 and BF16";

/// Widens little-endian `bytes` of `dtype` to f32, appending to `out`.
///
/// This converts every weight of a model at load time (26 GB for a 13B f16 model), so it
/// works in fixed-size chunks: the byte → u16 step is a plain loop the compiler vectorizes,
/// and f16 → f32 goes through `half`'s slice conversion, which uses the CPU's F16C / FP16
/// instructions when it has them. bf16 → f32 is exact and needs no table: the bf16 bits
/// are the top half of the f32 bits.
///
/// `bytes.len()` must be a multiple of the element size (callers have checked shapes).
pub fn extend_f32_from_le_bytes(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    const CHUNK: usize = 4096;
    out.reserve(bytes.len() / dtype.size_in_bytes());
    match dtype {
        DType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        DType::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)))
        }
        DType::F16 => {
            let mut bits = [0u16; CHUNK];
            let mut wide = [0f32; CHUNK];
            for chunk in bytes.chunks(CHUNK * 2) {
                let n = chunk.len() / 2;
                for (dst, b) in bits[..n].iter_mut().zip(chunk.chunks_exact(2)) {
                    *dst = u16::from_le_bytes([b[0], b[1]]);
                }
                let halves: &[f16] = bits[..n].reinterpret_cast();
                halves.convert_to_f32_slice(&mut wide[..n]);
                out.extend_from_slice(&wide[..n]);
            }
        }
    }
}

/// Widens little-endian `bytes` of `dtype` to a new f32 vector.
pub fn to_f32_vec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    extend_f32_from_le_bytes(dtype, bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_matches_half_scalar_conversion() {
        // Every f16 / bf16 bit pattern, including NaNs, infinities and subnormals.
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let from_f16 = to_f32_vec(DType::F16, &bytes);
        let from_bf16 = to_f32_vec(DType::BF16, &bytes);
        for bits in 0..=u16::MAX {
            let i = bits as usize;
            let want = f16::from_bits(bits).to_f32();
            assert!(want.to_bits() == from_f16[i].to_bits() || (want.is_nan() && from_f16[i].is_nan()));
            // bf16 widening keeps every bit (half quiets signalling NaNs; both stay NaN).
            assert_eq!(from_bf16[i].to_bits(), u32::from(bits) << 16);
            let want = half::bf16::from_bits(bits).to_f32();
            assert!(want.to_bits() == from_bf16[i].to_bits() || (want.is_nan() && from_bf16[i].is_nan()));
        }
        assert_eq!(to_f32_vec(DType::F32, &1.5f32.to_le_bytes()), vec![1.5]);
    }
}
