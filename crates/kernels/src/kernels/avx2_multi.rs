//! AVX2 multi-row kernels: a run of weight rows against `R` activation rows at once, each weight block loaded and
//! unpacked once (see `avx512_multi`, whose design this follows at 256 bits).
//!
//! Bit for bit the one-row result: per activation row, the integer sums and float operations are those of the
//! `avx2` row kernel, in the same order.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::{scales_mins_k4_words, BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8K, BlockQ8_0};
use crate::kernels::avx2::{group32_weighted_bsums, pair_isum};
use crate::kernels::x86::{half_at, reduce_add_256};
use crate::types::QK;

/// `avx2::pair_scale`'s weight half: the two blocks' f16 scales as f32 in lanes 0 and 1 (0 for a missing block).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_weight_scales(first_d: *const u8, second_d: *const u8) -> __m128 {
    let second = if second_d.is_null() { 0.0 } else { half_at(second_d) };
    _mm_setr_ps(half_at(first_d), second, 0.0, 0.0)
}

/// `avx2::pair_scale` from the weight scales of [`pair_weight_scales`]: the same products, the same lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_scale(dw: __m128, x_d: *const f32) -> __m256 {
    let both = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd(x_d.cast())));
    _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(both)))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_0<const R: usize>(w: &[u8], row_bytes: usize, x: &[Q8_0Row; R], out: &mut [&mut [f32]]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * BLOCK_BYTES * pair);
            let has_second = 2 * pair + 1 < blocks;
            let qa = _mm_loadu_si128(first.add(2).cast());
            let qb = if has_second { _mm_loadu_si128(first.add(BLOCK_BYTES + 2).cast()) } else { _mm_setzero_si128() };
            let packed = _mm256_set_m128i(_mm_unpackhi_epi32(qa, qb), _mm_unpacklo_epi32(qa, qb));
            let low = _mm256_and_si256(packed, low_nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low_nibble);
            let dw = pair_weight_scales(first, if has_second { first.add(BLOCK_BYTES) } else { std::ptr::null() });
            for (acc, &x) in acc.iter_mut().zip(x) {
                let isum = pair_isum(low, high, x, pair);
                let scale = pair_scale(dw, x.d.as_ptr().add(2 * pair));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            o[r] = reduce_add_256(acc);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q8_0<const R: usize>(w: &[u8], row_bytes: usize, x: &[Q8_0Row; R], out: &mut [&mut [f32]]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ8_0>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let ones = _mm256_set1_epi16(1);
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * BLOCK_BYTES * pair);
            let has_second = 2 * pair + 1 < blocks;
            let wa = _mm256_loadu_si256(first.add(2).cast());
            let wb =
                if has_second { _mm256_loadu_si256(first.add(BLOCK_BYTES + 2).cast()) } else { _mm256_setzero_si256() };
            let lo = _mm256_unpacklo_epi32(wa, wb);
            let hi = _mm256_unpackhi_epi32(wa, wb);
            let w0 = _mm256_permute2x128_si256::<0x20>(lo, hi);
            let w1 = _mm256_permute2x128_si256::<0x31>(lo, hi);
            let (abs0, abs1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
            let dw = pair_weight_scales(first, if has_second { first.add(BLOCK_BYTES) } else { std::ptr::null() });
            for (acc, x) in acc.iter_mut().zip(x) {
                let xq = x.qs.as_ptr().add(pair * 2 * QK);
                let (x0, x1) = (_mm256_loadu_si256(xq.cast()), _mm256_loadu_si256(xq.add(32).cast()));
                let d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(abs0, _mm256_sign_epi8(x0, w0)), ones);
                let d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(abs1, _mm256_sign_epi8(x1, w1)), ones);
                let isum = _mm256_add_epi32(d0, d1);
                let scale = pair_scale(dw, x.d.as_ptr().add(2 * pair));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            o[r] = reduce_add_256(acc);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_k<const R: usize>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins_total = [0.0f32; R];
        for i in 0..blocks {
            let b = p.add(i * BLOCK_BYTES);
            let (scales, mins) = scales_mins_k4_words(&*b.add(4).cast::<[u8; 12]>());
            let mut isum = [_mm256_setzero_si256(); R];
            for quarter in 0..4 {
                let packed = _mm256_loadu_si256(b.add(16 + 32 * quarter).cast());
                let low = _mm256_and_si256(packed, low_nibble);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low_nibble);
                let s0 = _mm256_set1_epi16((scales >> (16 * quarter) & 0xFF) as i16);
                let s1 = _mm256_set1_epi16((scales >> (16 * quarter + 8) & 0xFF) as i16);
                for (isum, x) in isum.iter_mut().zip(x) {
                    let ys = x[i].qs.as_ptr().add(64 * quarter);
                    let lo = _mm256_maddubs_epi16(low, _mm256_loadu_si256(ys.cast()));
                    let hi = _mm256_maddubs_epi16(high, _mm256_loadu_si256(ys.add(32).cast()));
                    *isum =
                        _mm256_add_epi32(*isum, _mm256_add_epi32(_mm256_madd_epi16(lo, s0), _mm256_madd_epi16(hi, s1)));
                }
            }
            let (dh, dminh) = (half_at(b), half_at(b.add(2)));
            for c in 0..R {
                let y = &x[c][i];
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), _mm256_set1_ps(dh * y.d), acc[c]);
                mins_total[c] += dminh * y.d * group32_weighted_bsums(mins, y) as f32;
            }
        }
        for c in 0..R {
            out[c][r] = reduce_add_256(acc[c]) - mins_total[c];
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q6_k<const R: usize>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ6K>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(3);
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        for i in 0..blocks {
            let b = p.add(i * BLOCK_BYTES);
            let scales = &*b.add(192).cast::<[i8; 16]>();
            let mut isum = [_mm256_setzero_si256(); R];
            for half in 0..2 {
                let qh = _mm256_loadu_si256(b.add(128 + 32 * half).cast());
                let ql_a = _mm256_loadu_si256(b.add(64 * half).cast());
                let ql_b = _mm256_loadu_si256(b.add(64 * half + 32).cast());
                let nibbles = [
                    _mm256_and_si256(ql_a, low_nibble),
                    _mm256_and_si256(ql_b, low_nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low_nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low_nibble),
                ];
                for (t, nibble) in nibbles.into_iter().enumerate() {
                    let top = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)), two_bits);
                    let q = _mm256_or_si256(nibble, _mm256_slli_epi16::<4>(top));
                    let g = 8 * half + 2 * t;
                    let s = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1] as i16), _mm_set1_epi16(scales[g] as i16));
                    for (isum, x) in isum.iter_mut().zip(x) {
                        let ys = x[i].qs.as_ptr().add(128 * half + 32 * t);
                        let prod = _mm256_maddubs_epi16(q, _mm256_loadu_si256(ys.cast()));
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(prod, s));
                    }
                }
            }
            let d = half_at(b.add(208));
            for c in 0..R {
                let y = &x[c][i];
                let offset: i32 = (0..16).map(|g| scales[g] as i32 * y.bsums[g] as i32).sum();
                let d = d * y.d;
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), _mm256_set1_ps(d), acc[c]);
                acc[c] =
                    _mm256_add_ps(acc[c], _mm256_setr_ps(-32.0 * offset as f32 * d, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0));
            }
        }
        for c in 0..R {
            out[c][r] = reduce_add_256(acc[c]);
        }
    }
}
