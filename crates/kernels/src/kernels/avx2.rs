//! AVX2 row kernels for CPUs without AVX-512: `vpmaddubsw` (unsigned × signed bytes to 16-bit pair sums) then
//! `vpmaddwd` to 32 bits, one 256-bit vector per pair of q4_0/q8_0 blocks or per 64 k-quant values.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::{scales_mins_k4_words, BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8K, BlockQ8_0};
use crate::kernels::x86::{half_at, reduce_add_256};
use crate::types::QK;

/// Weight-scale × activation-scale for the two blocks of a pair, as [even, odd] repeated over the vector (the
/// lane order the pair-interleaved activations give). `second_d` is null when the pair has one block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pair_scale(first_d: *const u8, second_d: *const u8, x_d: *const f32) -> __m256 {
    let second = if second_d.is_null() { 0.0 } else { half_at(second_d) };
    let dw = _mm_setr_ps(half_at(first_d), second, 0.0, 0.0);
    let both = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd(x_d.cast())));
    _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(both)))
}

/// Dot of an interleaved pair: `low` against the first 32 activation bytes, `high` against the next 32, plus the
/// pair's biases; lanes alternate between the two blocks.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pair_isum(low: __m256i, high: __m256i, x: Q8_0Row, pair: usize) -> __m256i {
    let xq = x.qs.as_ptr().add(pair * 2 * QK);
    let ones = _mm256_set1_epi16(1);
    // A nibble times a signed byte, summed in pairs and then over the two halves, stays below 4·15·127: no i16
    // saturation.
    let sum16 = _mm256_add_epi16(
        _mm256_maddubs_epi16(low, _mm256_loadu_si256(xq.cast())),
        _mm256_maddubs_epi16(high, _mm256_loadu_si256(xq.add(32).cast())),
    );
    let bias = _mm256_zextsi128_si256(_mm_loadl_epi64(x.bias.as_ptr().add(2 * pair).cast()));
    _mm256_add_epi32(_mm256_madd_epi16(sum16, ones), bias)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_0(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * BLOCK_BYTES * pair);
            let has_second = 2 * pair + 1 < blocks;
            let qa = _mm_loadu_si128(first.add(2).cast());
            let qb = if has_second { _mm_loadu_si128(first.add(BLOCK_BYTES + 2).cast()) } else { _mm_setzero_si128() };
            // Interleave the two blocks' nibble bytes four at a time, as the activations are.
            let packed = _mm256_set_m128i(_mm_unpackhi_epi32(qa, qb), _mm_unpacklo_epi32(qa, qb));
            let low = _mm256_and_si256(packed, low_nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low_nibble);
            let isum = pair_isum(low, high, x, pair);
            let scale = pair_scale(
                first,
                if has_second { first.add(BLOCK_BYTES) } else { std::ptr::null() },
                x.d.as_ptr().add(2 * pair),
            );
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc);
        }
        *o = reduce_add_256(acc);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q8_0(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ8_0>();
    let blocks = row_bytes / BLOCK_BYTES;
    let ones = _mm256_set1_epi16(1);
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * BLOCK_BYTES * pair);
            let has_second = 2 * pair + 1 < blocks;
            let wa = _mm256_loadu_si256(first.add(2).cast());
            let wb =
                if has_second { _mm256_loadu_si256(first.add(BLOCK_BYTES + 2).cast()) } else { _mm256_setzero_si256() };
            let lo = _mm256_unpacklo_epi32(wa, wb);
            let hi = _mm256_unpackhi_epi32(wa, wb);
            // Values 0..16 of both blocks, interleaved, then values 16..32.
            let w0 = _mm256_permute2x128_si256::<0x20>(lo, hi);
            let w1 = _mm256_permute2x128_si256::<0x31>(lo, hi);
            let xq = x.qs.as_ptr().add(pair * 2 * QK);
            let (x0, x1) = (_mm256_loadu_si256(xq.cast()), _mm256_loadu_si256(xq.add(32).cast()));
            // Signed × signed through vpmaddubsw: |w| × (x with w's sign). Pair sums stay below 2·128·127.
            let d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0)), ones);
            let d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1)), ones);
            let isum = _mm256_add_epi32(d0, d1);
            let scale = pair_scale(
                first,
                if has_second { first.add(BLOCK_BYTES) } else { std::ptr::null() },
                x.d.as_ptr().add(2 * pair),
            );
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc);
        }
        *o = reduce_add_256(acc);
    }
}

/// Σ_g weights[g] · (bsums[2g] + bsums[2g + 1]) over the 8 groups of 32, with `weights` as the bytes of a u64.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn group32_weighted_bsums(weights: u64, y: &BlockQ8K) -> i32 {
    let w16 =
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_cvtsi64_si128(weights as i64), _mm_cvtsi64_si128(weights as i64)));
    let prod = _mm256_madd_epi16(w16, _mm256_loadu_si256(y.bsums.as_ptr().cast()));
    let s = _mm_add_epi32(_mm256_castsi256_si128(prod), _mm256_extracti128_si256::<1>(prod));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b00_00_00_01>(s)))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut mins_total = 0.0f32;
        for (i, y) in x[..blocks].iter().enumerate() {
            let b = p.add(i * BLOCK_BYTES);
            let (scales, mins) = scales_mins_k4_words(&*b.add(4).cast::<[u8; 12]>());
            let mut isum = _mm256_setzero_si256();
            for quarter in 0..4 {
                let packed = _mm256_loadu_si256(b.add(16 + 32 * quarter).cast());
                let ys = y.qs.as_ptr().add(64 * quarter);
                let low = _mm256_maddubs_epi16(_mm256_and_si256(packed, low_nibble), _mm256_loadu_si256(ys.cast()));
                let high = _mm256_maddubs_epi16(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low_nibble),
                    _mm256_loadu_si256(ys.add(32).cast()),
                );
                let s0 = _mm256_set1_epi16((scales >> (16 * quarter) & 0xFF) as i16);
                let s1 = _mm256_set1_epi16((scales >> (16 * quarter + 8) & 0xFF) as i16);
                isum =
                    _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_madd_epi16(low, s0), _mm256_madd_epi16(high, s1)));
            }
            let d = half_at(b) * y.d;
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
            mins_total += half_at(b.add(2)) * y.d * group32_weighted_bsums(mins, y) as f32;
        }
        *o = reduce_add_256(acc) - mins_total;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q6_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ6K>();
    let blocks = row_bytes / BLOCK_BYTES;
    let low_nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(3);
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for (i, y) in x[..blocks].iter().enumerate() {
            let b = p.add(i * BLOCK_BYTES);
            let scales = &*b.add(192).cast::<[i8; 16]>();
            let mut isum = _mm256_setzero_si256();
            for half in 0..2 {
                let qh = _mm256_loadu_si256(b.add(128 + 32 * half).cast());
                let ql_a = _mm256_loadu_si256(b.add(64 * half).cast());
                let ql_b = _mm256_loadu_si256(b.add(64 * half + 32).cast());
                // Values 32t .. 32t + 32 of this half: nibble source and the qh bit pair 2t, 2t + 1.
                let nibbles = [
                    _mm256_and_si256(ql_a, low_nibble),
                    _mm256_and_si256(ql_b, low_nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low_nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low_nibble),
                ];
                for (t, nibble) in nibbles.into_iter().enumerate() {
                    let top = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)), two_bits);
                    let q = _mm256_or_si256(nibble, _mm256_slli_epi16::<4>(top));
                    let prod =
                        _mm256_maddubs_epi16(q, _mm256_loadu_si256(y.qs.as_ptr().add(128 * half + 32 * t).cast()));
                    // The low 128 bits hold group 8·half + 2t, the high 128 bits the next group.
                    let g = 8 * half + 2 * t;
                    let s = _mm256_set_m128i(_mm_set1_epi16(scales[g + 1] as i16), _mm_set1_epi16(scales[g] as i16));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(prod, s));
                }
            }
            // The stored values are q + 32.
            let offset: i32 = (0..16).map(|g| scales[g] as i32 * y.bsums[g] as i32).sum();
            let d = half_at(b.add(208)) * y.d;
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
            acc = _mm256_add_ps(acc, _mm256_setr_ps(-32.0 * offset as f32 * d, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0));
        }
        *o = reduce_add_256(acc);
    }
}

/// Dot products of float rows with `x`: `$load(ptr)` widens 8 elements at byte pointer `ptr` to f32.
macro_rules! float_rows {
    ($w:expr, $row_bytes:expr, $x:expr, $out:expr, $element_bytes:expr, $load:expr, $element:expr) => {{
        let k = $row_bytes / $element_bytes;
        let xp = $x.as_ptr();
        for (row, o) in $w.chunks_exact($row_bytes).zip($out) {
            let p = row.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= k {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let e = i + 8 * a;
                    *acc = _mm256_fmadd_ps($load(p.add(e * $element_bytes)), _mm256_loadu_ps(xp.add(e)), *acc);
                }
                i += 32;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = reduce_add_256(sum);
            for e in i..k {
                total += $element(p.add(e * $element_bytes)) * *xp.add(e);
            }
            *o = total;
        }
    }};
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_f32x8(p: *const u8) -> __m256 {
    _mm256_loadu_ps(p.cast())
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_bf16x8(p: *const u8) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))))
}

unsafe fn f32_at(p: *const u8) -> f32 {
    std::ptr::read_unaligned(p.cast::<f32>())
}

unsafe fn bf16_at(p: *const u8) -> f32 {
    crate::dequant::bf16_to_f32(u16::from_le_bytes([*p, *p.add(1)]))
}

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_f32(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 4, load_f32x8, f32_at)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_f16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 2, load_f16x8, half_at)
}

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_bf16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 2, load_bf16x8, bf16_at)
}
