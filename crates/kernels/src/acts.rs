//! Activations quantized for the integer dot products, in the layouts the kernels read.
//!
//! The values are exactly those of ggml's reference quantizers (`quantize_row_q8_0_ref`, `quantize_row_q8_K_ref`);
//! only where they are stored differs. The AVX-512 and AVX2 quantizers here produce the same bytes as the scalar
//! ones (tested), they are just faster: for one decode step the activations are re-quantized for every matrix. (The
//! scalar q8_0 quantizer, with `roundf` per value, took about 25 µs a row of 5120 values on Zen 4: a fixed cost per
//! activation row and product that was most of a small product's time, `kernel_bench --hot 1 --shapes 64x5120`.)

use crate::blocks::{BlockQ8K, Half};
use crate::isa::Isa;
use crate::quant::quantize_q8_k;
use crate::types::{QK, QK_K};

/// `n` activation rows of `k` values quantized to q8_0 (one f16-rounded scale per 32 values, halves rounded away
/// from zero), prepared for weights whose unsigned stored value is `q + zero_point`.
///
/// Blocks are stored in pairs, and within a pair the two blocks' values are interleaved four bytes at a time:
/// bytes `8 * g .. 8 * g + 4` of a pair are values `4 * g .. 4 * g + 4` of its first block and the next four bytes
/// the same values of its second block. A 512-bit `vpdpbusd` over a pair then sums the first block into the even
/// 32-bit lanes and the second into the odd ones, so a block's scale (and `bias`) can be fetched per pair with one
/// 8-byte broadcast instead of being spread over eight lanes.
pub(crate) struct ActsQ8_0 {
    /// Blocks per row, rounded up to a whole number of pairs (the padding block is all zeros).
    pub blocks: usize,
    /// `n * blocks * 32` quantized values, pair-interleaved as described above.
    pub qs: Vec<i8>,
    /// `n * blocks` scales (the f16 value ggml stores, as f32).
    pub d: Vec<f32>,
    /// `n * blocks` times `-zero_point * sum(q)`: what turns a dot with the offset weights back into one with the
    /// signed weights.
    pub bias: Vec<i32>,
    /// The same values by quads of blocks, for the AVX-512 q4_0 row kernel (filled only for q4_0's zero point and
    /// few activation rows on AVX-512, the decode path; empty otherwise). Per row, `quads = ceil(k / 128)` quads,
    /// the last zero-padded: `natural` has 128 bytes per quad, values 0..16 of its four blocks (16 bytes each), then
    /// values 16..32;
    pub natural: Vec<i8>,
    /// 4 biases per quad;
    pub natural_bias: Vec<i32>,
    /// and 4 scales per quad.
    pub natural_d: Vec<f32>,
    /// Quads per row in `natural*`.
    pub quads: usize,
}

/// One row of [`ActsQ8_0`].
#[derive(Clone, Copy)]
pub(crate) struct Q8_0Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub bias: &'a [i32],
    /// Empty unless [`ActsQ8_0::natural`] was filled.
    pub natural: &'a [i8],
    pub natural_bias: &'a [i32],
    pub natural_d: &'a [f32],
}

/// Where value `e` of block `j` sits in a pair-interleaved row.
#[inline]
pub(crate) fn interleaved_index(j: usize, e: usize) -> usize {
    (j / 2) * 2 * QK + (e / 4) * 8 + (j % 2) * 4 + e % 4
}

impl ActsQ8_0 {
    /// Quantizes `n` rows of `k` values (`x.len() == n * k`, `k` a multiple of 32).
    pub fn new(x: &[f32], n: usize, k: usize, zero_point: i32, isa: Isa) -> ActsQ8_0 {
        debug_assert!(k.is_multiple_of(QK) && x.len() == n * k);
        let blocks = (k / QK).div_ceil(2) * 2;
        // Only the AVX-512 q4_0 row kernel (zero point 8) reads the quads, and row kernels run for few activation rows.
        let quads = (k / QK).div_ceil(4);
        let rows_natural = if isa == Isa::Avx512 && n < NATURAL_MAX_ROWS && zero_point == 8 { n } else { 0 };
        let mut acts = ActsQ8_0 {
            blocks,
            qs: vec![0; n * blocks * QK],
            d: vec![0.0; n * blocks],
            bias: vec![0; n * blocks],
            natural: vec![0; rows_natural * quads * 4 * QK],
            natural_bias: vec![0; rows_natural * quads * 4],
            natural_d: vec![0.0; rows_natural * quads * 4],
            quads,
        };
        for (c, x) in x.chunks_exact(k).enumerate() {
            let qs = &mut acts.qs[c * blocks * QK..(c + 1) * blocks * QK];
            let d = &mut acts.d[c * blocks..(c + 1) * blocks];
            let bias = &mut acts.bias[c * blocks..(c + 1) * blocks];
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                let natural = if rows_natural > 0 {
                    &mut acts.natural[c * quads * 4 * QK..(c + 1) * quads * 4 * QK]
                } else {
                    &mut [][..]
                };
                // SAFETY: the caller picked `isa` from what this CPU supports.
                unsafe { avx512::quantize_q8_0_row(x, zero_point, qs, d, bias, natural) };
                if rows_natural > 0 {
                    for j in 0..k / QK {
                        let at = c * quads * 4 + j;
                        acts.natural_bias[at] = bias[j];
                        acts.natural_d[at] = d[j];
                    }
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                // SAFETY: the caller picked `isa` from what this CPU supports.
                unsafe { avx2::quantize_q8_0_row(x, zero_point, qs, d, bias) };
                continue;
            }
            let _ = isa;
            quantize_q8_0_row_scalar(x, zero_point, qs, d, bias);
        }
        acts
    }

    pub fn row(&self, c: usize) -> Q8_0Row<'_> {
        let (b, q) = (self.blocks, self.quads);
        Q8_0Row {
            qs: &self.qs[c * b * QK..(c + 1) * b * QK],
            d: &self.d[c * b..(c + 1) * b],
            bias: &self.bias[c * b..(c + 1) * b],
            natural: if self.natural.is_empty() { &[] } else { &self.natural[c * q * 4 * QK..(c + 1) * q * 4 * QK] },
            natural_bias: if self.natural.is_empty() { &[] } else { &self.natural_bias[c * q * 4..(c + 1) * q * 4] },
            natural_d: if self.natural.is_empty() { &[] } else { &self.natural_d[c * q * 4..(c + 1) * q * 4] },
        }
    }
}

/// Below this many activation rows, AVX-512 activations also get the natural order, for the q4_0 row and multi-row
/// kernels (the GEMM path, which takes over well before, has its own layout).
const NATURAL_MAX_ROWS: usize = 32;

/// The reference: ggml's `quantize_row_q8_0_ref` per block, stored pair-interleaved.
fn quantize_q8_0_row_scalar(x: &[f32], zero_point: i32, qs: &mut [i8], d: &mut [f32], bias: &mut [i32]) {
    for (j, xb) in x.chunks_exact(QK).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (e, &v) in xb.iter().enumerate() {
            let q = (v * id).round() as i8;
            qs[interleaved_index(j, e)] = q;
            sum += q as i32;
        }
        d[j] = Half::from_f32(scale).to_f32();
        bias[j] = -zero_point * sum;
    }
}

/// One row quantized to q8_0 in natural order: `qs[32 j + e]` is value `e` of block `j`, `d[j]` its scale (the same
/// values as [`ActsQ8_0`]). For the AVX-512 GEMM tiles, which lay the values out themselves.
///
/// # Safety
/// AVX-512 (`Isa::Avx512`) must be available.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn quantize_q8_0_natural(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    assert!(x.len() == qs.len() && d.len() * QK == x.len());
    for (j, (q, d)) in qs.chunks_exact_mut(QK).zip(d.iter_mut()).enumerate() {
        let (bytes, scale, _) = avx512::quantize_q8_0_block(x.as_ptr().add(j * QK));
        std::arch::x86_64::_mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
        *d = scale;
    }
}

/// `n` activation rows of `k` values quantized to q8_K (ggml's `block_q8_K`, natural order).
pub(crate) struct ActsQ8K {
    /// Super-blocks per row.
    pub blocks: usize,
    pub data: Vec<BlockQ8K>,
}

impl ActsQ8K {
    /// Quantizes `n` rows of `k` values (`x.len() == n * k`, `k` a multiple of 256).
    pub fn new(x: &[f32], n: usize, k: usize, isa: Isa) -> ActsQ8K {
        debug_assert!(k.is_multiple_of(QK_K) && x.len() == n * k);
        let blocks = k / QK_K;
        let mut data = vec![BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] }; n * blocks];
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            for (x, y) in x.chunks_exact(QK_K).zip(data.iter_mut()) {
                // SAFETY: the caller picked `isa` from what this CPU supports.
                unsafe { avx512::quantize_q8_k_block(x.try_into().unwrap(), y) };
            }
            return ActsQ8K { blocks, data };
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            for (x, y) in x.chunks_exact(QK_K).zip(data.iter_mut()) {
                // SAFETY: the caller picked `isa` from what this CPU supports.
                unsafe { avx2::quantize_q8_k_block(x.try_into().unwrap(), y) };
            }
            return ActsQ8K { blocks, data };
        }
        let _ = isa;
        quantize_q8_k(x, &mut data);
        ActsQ8K { blocks, data }
    }

    pub fn row(&self, c: usize) -> &[BlockQ8K] {
        &self.data[c * self.blocks..(c + 1) * self.blocks]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `quantize_row_q8_0_ref`'s rounding, `roundf`: to nearest, halves away from zero. `v - trunc(v)` is exact, so
    /// comparing it with one half decides the tie correctly.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_half_away(v: __m512) -> __m512 {
        let truncated = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let fraction = _mm512_abs_ps(_mm512_sub_ps(v, truncated));
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fraction, _mm512_set1_ps(0.5));
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(1.0))));
        _mm512_mask_add_ps(truncated, away, truncated, one)
    }

    /// One block of 32 values → its 32 quants (as a 256-bit vector), f16-rounded scale and quant sum.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn quantize_q8_0_block(x: *const f32) -> (__m256i, f32, i32) {
        let a = _mm512_loadu_ps(x);
        let b = _mm512_loadu_ps(x.add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let scale = amax / 127.0;
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let qa = _mm512_cvtps_epi32(round_half_away(_mm512_mul_ps(a, _mm512_set1_ps(id))));
        let qb = _mm512_cvtps_epi32(round_half_away(_mm512_mul_ps(b, _mm512_set1_ps(id))));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        let bytes = _mm256_set_m128i(_mm512_cvtepi32_epi8(qb), _mm512_cvtepi32_epi8(qa));
        let rounded = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(scale))));
        (bytes, rounded, sum)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn quantize_q8_0_row(
        x: &[f32],
        zero_point: i32,
        qs: &mut [i8],
        d: &mut [f32],
        bias: &mut [i32],
        natural: &mut [i8],
    ) {
        let real_blocks = x.len() / QK;
        // Output dword 2g takes dword g of the first block, dword 2g + 1 dword g of the second.
        let interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        for pair in 0..d.len() / 2 {
            let mut halves = [_mm256_setzero_si256(); 2];
            for (b, half) in halves.iter_mut().enumerate() {
                let j = 2 * pair + b;
                if j < real_blocks {
                    let (bytes, scale, sum) = quantize_q8_0_block(x.as_ptr().add(j * QK));
                    *half = bytes;
                    if !natural.is_empty() {
                        let at = natural.as_mut_ptr().add(4 * QK * (j / 4) + 16 * (j % 4));
                        _mm_storeu_si128(at.cast(), _mm256_castsi256_si128(bytes));
                        _mm_storeu_si128(at.add(2 * QK).cast(), _mm256_extracti128_si256::<1>(bytes));
                    }
                    d[j] = scale;
                    bias[j] = -zero_point * sum;
                }
            }
            let mixed = _mm512_permutex2var_epi32(
                _mm512_castsi256_si512(halves[0]),
                interleave,
                _mm512_castsi256_si512(halves[1]),
            );
            _mm512_storeu_si512(qs.as_mut_ptr().add(pair * 2 * QK).cast(), mixed);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_q8_k_block(x: &[f32; QK_K], y: &mut BlockQ8K) {
        let p = x.as_ptr();
        let mut amax_v = _mm512_setzero_ps();
        for i in 0..16 {
            amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))));
        }
        let amax = _mm512_reduce_max_ps(amax_v);
        if amax == 0.0 {
            *y = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
            return;
        }
        // The reference keeps the sign of the first value reaching the largest magnitude.
        let mut max = 0.0;
        for i in 0..16 {
            let hits =
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))), _mm512_set1_ps(amax));
            if hits != 0 {
                max = x[16 * i + hits.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let vscale = _mm512_set1_ps(iscale);
        for i in 0..16 {
            let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * i)), vscale);
            let q = _mm512_min_epi32(
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                _mm512_set1_epi32(127),
            );
            _mm_storeu_si128(y.qs.as_mut_ptr().add(16 * i).cast(), _mm512_cvtepi32_epi8(q));
            y.bsums[i] = _mm512_reduce_add_epi32(q) as i16;
        }
        y.d = 1.0 / iscale;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// `roundf` (to nearest, halves away from zero), as the AVX-512 quantizer does it: `v - trunc(v)` is exact.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn round_half_away(v: __m256) -> __m256 {
        let truncated = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
        let fraction = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(v, truncated));
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(fraction, _mm256_set1_ps(0.5));
        let one = _mm256_or_ps(sign, _mm256_set1_ps(1.0));
        _mm256_add_ps(truncated, _mm256_and_ps(away, one))
    }

    /// The largest of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce_max(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce_add(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
    }

    /// Four vectors of eight 32-bit integers (each in -128..=127) as 32 bytes in their order.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn to_bytes(q: [__m256i; 4]) -> __m256i {
        // The packs work within 128-bit lanes: dword k of the result holds values 4·[0, 2, 4, 6, 1, 3, 5, 7][k]...
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// One block of 32 values → its 32 quants (natural order), f16-rounded scale and quant sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8_0_block(x: *const f32) -> (__m256i, f32, i32) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(8 * i)));
        let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        let amax = reduce_max(_mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3]))));
        let scale = amax / 127.0;
        let id = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let q = v.map(|v| _mm256_cvtps_epi32(round_half_away(_mm256_mul_ps(v, id))));
        let sum = reduce_add(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        let rounded = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(scale))));
        (to_bytes(q), rounded, sum)
    }

    /// [`quantize_q8_0_row_scalar`]'s results, pair-interleaved by 32-bit words as [`ActsQ8_0`] stores them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_0_row(x: &[f32], zero_point: i32, qs: &mut [i8], d: &mut [f32], bias: &mut [i32]) {
        let real_blocks = x.len() / QK;
        for pair in 0..d.len() / 2 {
            let mut halves = [_mm256_setzero_si256(); 2];
            for (b, half) in halves.iter_mut().enumerate() {
                let j = 2 * pair + b;
                if j < real_blocks {
                    let (bytes, scale, sum) = quantize_q8_0_block(x.as_ptr().add(j * QK));
                    *half = bytes;
                    d[j] = scale;
                    bias[j] = -zero_point * sum;
                }
            }
            // Words g of the two blocks side by side: unpack within 128-bit lanes, then put the lanes in order.
            let lo = _mm256_unpacklo_epi32(halves[0], halves[1]);
            let hi = _mm256_unpackhi_epi32(halves[0], halves[1]);
            let out = qs.as_mut_ptr().add(pair * 2 * QK);
            _mm256_storeu_si256(out.cast(), _mm256_permute2x128_si256::<0x20>(lo, hi));
            _mm256_storeu_si256(out.add(QK).cast(), _mm256_permute2x128_si256::<0x31>(lo, hi));
        }
    }

    /// [`quantize_q8_k`] for one super-block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_q8_k_block(x: &[f32; QK_K], y: &mut BlockQ8K) {
        let p = x.as_ptr();
        let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        let mut amax_v = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            amax_v = _mm256_max_ps(amax_v, abs(_mm256_loadu_ps(p.add(8 * i))));
        }
        let amax = reduce_max(amax_v);
        if amax == 0.0 {
            *y = BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };
            return;
        }
        // The reference keeps the sign of the first value reaching the largest magnitude.
        let first = x.iter().position(|v| v.abs() == amax).expect("amax is one of the values");
        let iscale = -127.0 / x[first];
        let vscale = _mm256_set1_ps(iscale);
        for i in 0..QK_K / 32 {
            // The reference's `nearest_int` rounds halves to even, as the conversion does in the default mode.
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * i + 8 * k)), vscale);
                _mm256_min_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(127))
            });
            _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * i).cast(), to_bytes(q));
            y.bsums[2 * i] = reduce_add(_mm256_add_epi32(q[0], q[1])) as i16;
            y.bsums[2 * i + 1] = reduce_add(_mm256_add_epi32(q[2], q[3])) as i16;
        }
        y.d = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                // Every 7th block is scaled so that some products land exactly on halves.
                if (i / 32) % 7 == 3 {
                    ((u * 254.0).round()) / 2.0
                } else {
                    u * 3.0
                }
            })
            .collect()
    }

    /// The SIMD levels this CPU has (the others are skipped, and said so).
    fn simd_levels() -> Vec<Isa> {
        let (have, skip): (Vec<Isa>, Vec<Isa>) =
            [Isa::Avx2, Isa::Avx512].into_iter().partition(|isa| isa.is_available());
        if !skip.is_empty() {
            eprintln!("skipped (not on this CPU): {skip:?}");
        }
        have
    }

    #[test]
    fn simd_q8_0_activations_equal_scalar() {
        for isa in simd_levels() {
            for k in [32, 64, 96, 512, 5120] {
                let mut x = sample(3 * k, k as u64);
                x[..32].fill(0.0);
                let scalar = ActsQ8_0::new(&x, 3, k, 8, Isa::Scalar);
                let simd = ActsQ8_0::new(&x, 3, k, 8, isa);
                assert_eq!(scalar.qs, simd.qs, "{isa:?}, k = {k}");
                assert_eq!(scalar.d, simd.d, "{isa:?}, k = {k}");
                assert_eq!(scalar.bias, simd.bias, "{isa:?}, k = {k}");
                if isa != Isa::Avx512 {
                    continue;
                }
                for c in 0..3 {
                    let (row, base) = (simd.row(c), c * simd.blocks);
                    assert_eq!(row.natural.len(), simd.quads * 128);
                    for j in 0..simd.quads * 4 {
                        let real = j < k / QK;
                        let (d, bias) = if real { (simd.d[base + j], simd.bias[base + j]) } else { (0.0, 0) };
                        assert_eq!(row.natural_d[j], d, "k = {k}");
                        assert_eq!(row.natural_bias[j], bias, "k = {k}");
                        for e in 0..QK {
                            let q = if real { simd.qs[base * QK + interleaved_index(j, e)] } else { 0 };
                            let at = 128 * (j / 4) + 16 * (j % 4) + 64 * (e / 16) + e % 16;
                            assert_eq!(row.natural[at], q, "k = {k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn simd_q8_k_activations_equal_scalar() {
        for isa in simd_levels() {
            let mut x = sample(4 * QK_K, 99);
            x[..QK_K].fill(0.0);
            // Two values of the largest magnitude with opposite signs: the first one's sign is the scale's.
            x[QK_K + 5] = 7.0;
            x[QK_K + 9] = -7.0;
            x[3 * QK_K + 2] = -9.0;
            x[3 * QK_K + 200] = 9.0;
            let scalar = ActsQ8K::new(&x, 2, 2 * QK_K, Isa::Scalar);
            let simd = ActsQ8K::new(&x, 2, 2 * QK_K, isa);
            assert_eq!(scalar.data, simd.data, "{isa:?}");
        }
    }

    #[test]
    fn interleaved_rows_hold_the_reference_quants() {
        let x = sample(3 * QK, 5);
        let acts = ActsQ8_0::new(&x, 1, 3 * QK, 8, Isa::Scalar);
        let mut reference = vec![crate::blocks::BlockQ8_0 { d: Half::ZERO, qs: [0; QK] }; 3];
        crate::quant::quantize_q8_0(&x, &mut reference);
        assert_eq!(acts.blocks, 4);
        for (j, block) in reference.iter().enumerate() {
            assert_eq!(acts.d[j], block.d.to_f32());
            for e in 0..QK {
                assert_eq!(acts.qs[interleaved_index(j, e)], block.qs[e]);
            }
            assert_eq!(acts.bias[j], -8 * block.qs.iter().map(|&q| q as i32).sum::<i32>());
        }
        assert_eq!((acts.d[3], acts.bias[3]), (0.0, 0));
        assert!((0..QK).all(|e| acts.qs[interleaved_index(3, e)] == 0));
    }
}
