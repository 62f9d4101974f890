//! Small helpers shared by the AVX2 and AVX-512 kernels.

use std::arch::x86_64::*;

/// An f16 from two little-endian bytes, converted with F16C.
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) unsafe fn half_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*p, *p.add(1)]) as i32)))
}

/// The sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn reduce_add_256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
