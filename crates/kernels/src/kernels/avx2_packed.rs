//! AVX2 kernels for q4_0, q8_0 and q4_K weights interleaved by 16 rows ([`crate::packed`]), for CPUs (or VMs) without
//! AVX-512.
//!
//! The layout is the one the AVX-512 kernels read: each 64-byte vector holds four quant bytes of each of 16 rows, a
//! row per 32-bit lane. Here it is two 256-bit halves, rows 0..8 and rows 8..16, and each half meets a broadcast of
//! the matching four activation bytes in `vpmaddubsw` (unsigned × signed bytes to 16-bit pair sums), so each lane
//! sums its own row and nothing is reduced across lanes. A block's 16 weight scales are one load.
//!
//! - q4_0: the nibbles are unpacked with an `and` and a shift; a block's 16-bit pair sums (at most 8 · 2 · 15 · 127
//!   = 30480) are added up in 16 bits and widened once per block by `vpmaddwd`. Per block of 16 rows (288 bytes)
//!   that is 8 loads, 16 unpacking instructions, 16 `vpmaddubsw` and 14 16-bit adds, and per half a `vpmaddwd`
//!   and the scaling: about 70 instructions, where the GGUF-layout row kernel (`avx2::rows_q4_0`) needs about 8 per
//!   36 bytes and a reduction across lanes per row.
//! - q8_0 is stored as `q + 128` (the AVX-512 kernels' operand); `vpmaddubsw` on it would saturate, so the signed
//!   value is recovered (`xor`) and multiplied as |q| × (a with q's sign), widened per vector.
//!
//! A few activation rows at once (a server's batch, a speculative verify pass) share each unpacked vector, and each
//! row's result is bit for bit what it gets alone and what the scalar reference (`scalar::groups`) gives: the
//! integer block sums are exact, then one fused multiply-add per block with the product of the two scales.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::BlockQ8K;
use crate::kernels::avx512::{prefetch_ahead_by, PACKED_PREFETCH_DISTANCE};
use crate::packed::{q4_k_min_pairs, quant_bytes, Q4_K_D, Q4_K_DMIN, Q4_K_GROUP_BYTES, Q4_K_QUANTS, Q4_K_SCALES};
use crate::types::{GgmlType, QK};

/// Rows per group ([`crate::packed::GROUP_ROWS`]), one per 32-bit lane of a 512-bit vector: two 256-bit halves.
const LANES: usize = 16;

/// `out[c][16g + r] = dot(row r of group g, x[c])` for the whole groups of interleaved q4_0 rows in `w` (rows of
/// `row_bytes` in GGUF's layout) and `R` activation rows (pair-interleaved, `Q8_0Row::qs`).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` is a whole number of groups; each `out[c]` holds 16 outputs per group.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn groups_q4_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    groups::<R, PF, false>(w, row_bytes, x, out)
}

/// [`groups_q4_0`] for interleaved q8_0 rows (stored `q + 128`).
///
/// # Safety
/// As [`groups_q4_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn groups_q8_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    groups::<R, PF, true>(w, row_bytes, x, out)
}

/// The four activation bytes at `p` in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn broadcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()))
}

/// The kernel of [`groups_q4_0`] (`Q8` false) and [`groups_q8_0`] (`Q8` true): they differ only in how a block's
/// vectors become its integer sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
// The halves `h` and activation rows `c` index the vectors and the activations in step.
#[allow(clippy::needless_range_loop)]
unsafe fn groups<const R: usize, const PF: u8, const Q8: bool>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    let ty = if Q8 { GgmlType::Q8_0 } else { GgmlType::Q4_0 };
    let (quant_len, pair_len) = (quant_bytes(ty), 2 * LANES * ty.block_bytes());
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / ty.block_bytes();
    let low_nibble = _mm256_set1_epi8(0x0F);
    let sign_bit = _mm256_set1_epi8(0x80u8 as i8);
    let ones = _mm256_set1_epi16(1);
    let end = w.as_ptr_range().end;
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let p = group.as_ptr();
        // Per activation row, rows 0..8 and rows 8..16 of the group.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for pair in 0..blocks.div_ceil(2) {
            let base = p.add(pair * pair_len);
            if Q8 {
                prefetch_ahead_by::<17, PF, PACKED_PREFETCH_DISTANCE>(base, end);
            } else {
                prefetch_ahead_by::<9, PF, PACKED_PREFETCH_DISTANCE>(base, end);
            }
            let in_pair = (blocks - 2 * pair).min(2);
            for second in 0..in_pair {
                let j = 2 * pair + second;
                let quants = base.add(second * quant_len);
                // Block j's activations: values 4t..4t + 4 at 8t + 4·second of the pair.
                let xq: [*const i8; R] = std::array::from_fn(|c| x[c].qs.as_ptr().add(pair * 2 * QK + 4 * second));
                let mut isum = [[_mm256_setzero_si256(); 2]; R];
                if Q8 {
                    for t in 0..8 {
                        for h in 0..2 {
                            let q = _mm256_xor_si256(_mm256_loadu_si256(quants.add(64 * t + 32 * h).cast()), sign_bit);
                            let magnitude = _mm256_abs_epi8(q);
                            for c in 0..R {
                                let a = _mm256_sign_epi8(broadcast4(xq[c].add(8 * t)), q);
                                let pairs = _mm256_maddubs_epi16(magnitude, a);
                                isum[c][h] = _mm256_add_epi32(isum[c][h], _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                } else {
                    let mut sum16 = [[_mm256_setzero_si256(); 2]; R];
                    for t in 0..4 {
                        for h in 0..2 {
                            let v = _mm256_loadu_si256(quants.add(64 * t + 32 * h).cast());
                            let lo = _mm256_and_si256(v, low_nibble);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low_nibble);
                            for c in 0..R {
                                let lo = _mm256_maddubs_epi16(lo, broadcast4(xq[c].add(8 * t)));
                                let hi = _mm256_maddubs_epi16(hi, broadcast4(xq[c].add(QK + 8 * t)));
                                sum16[c][h] = _mm256_add_epi16(sum16[c][h], _mm256_add_epi16(lo, hi));
                            }
                        }
                    }
                    // The stored nibbles are q + 8: each sum starts at the block's bias.
                    for c in 0..R {
                        let bias = _mm256_set1_epi32(*x[c].bias.get_unchecked(j));
                        for h in 0..2 {
                            isum[c][h] = _mm256_add_epi32(bias, _mm256_madd_epi16(sum16[c][h], ones));
                        }
                    }
                }
                let scales = base.add(in_pair * quant_len + second * 2 * LANES);
                let dw = [0, 1].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(scales.add(16 * h).cast())));
                for c in 0..R {
                    let dx = _mm256_set1_ps(*x[c].d.get_unchecked(j));
                    for h in 0..2 {
                        let scale = _mm256_mul_ps(dw[h], dx);
                        acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c][h]), scale, acc[c][h]);
                    }
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            for (h, acc) in acc.into_iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(LANES * g + 8 * h), acc);
            }
        }
    }
}

/// Interleaved q4_K rows against `R` q8_K activation rows, half a group (8 rows) at a time. Per super-block and
/// half: the 6-bit scales and mins of its 8 rows unpacked at once (as `blocks::scales_mins_k4_words` does for one
/// row); per quarter, eight vectors of quants whose low nibbles are sub-block `2q` and whose high nibbles are
/// sub-block `2q + 1`, against broadcasts of four activation values, summed in 16 bits (at most 8 · 2 · 15 · 128
/// = 30720); `vpmaddwd` with the sub-block's scale in both 16-bit halves of each lane widens and scales in one;
/// the mins meet the activations' sub-block sums, as pairs of 16-bit values, in `vpmaddwd` too; then the two
/// scalings, as the scalar reference (`scalar::groups_q4_k`) does them.
///
/// # Safety
/// As [`groups_q4_0`], with q8_K activations of the rows' length.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn groups_q4_k<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / GgmlType::Q4_K.block_bytes();
    let low_nibble = _mm256_set1_epi8(0x0F);
    let (low6, low4, top2) =
        (_mm256_set1_epi32(0x3f3f_3f3f), _mm256_set1_epi32(0x0f0f_0f0f), _mm256_set1_epi32(0x0303_0303));
    let (byte, words) = (_mm256_set1_epi32(0xFF), _mm256_set1_epi32(0x00FF_00FF));
    let end = w.as_ptr_range().end;
    // The activations' sub-block sums as pairs of 16-bit values, once per call rather than once per group of rows.
    let pairs = q4_k_min_pairs(x, blocks);
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let sb = group.as_ptr().add(b * Q4_K_GROUP_BYTES);
            prefetch_ahead_by::<{ Q4_K_GROUP_BYTES / 64 }, PF, PACKED_PREFETCH_DISTANCE>(sb, end);
            for h in 0..2 {
                // Scales and mins of the half's 8 rows: four bytes a lane in each of four words.
                let load = |at: usize| _mm256_loadu_si256(sb.add(at + 32 * h).cast());
                let (a, bw, c) = (load(Q4_K_SCALES), load(Q4_K_SCALES + 64), load(Q4_K_SCALES + 128));
                let scales_lo = _mm256_and_si256(a, low6);
                let scales_hi = _mm256_or_si256(
                    _mm256_and_si256(c, low4),
                    _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(a), top2)),
                );
                let mins_lo = _mm256_and_si256(bw, low6);
                let mins_hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi32::<4>(c), low4),
                    _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(bw), top2)),
                );
                // Sub-block s's scale in both 16-bit halves of each lane.
                let scale_of = |s: usize| {
                    let word = if s < 4 { scales_lo } else { scales_hi };
                    let scale = _mm256_and_si256(_mm256_srl_epi32(word, _mm_cvtsi32_si128(8 * (s % 4) as i32)), byte);
                    _mm256_or_si256(scale, _mm256_slli_epi32::<16>(scale))
                };
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sb.add(Q4_K_D + 16 * h).cast()));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sb.add(Q4_K_DMIN + 16 * h).cast()));
                let mut sumi = [_mm256_setzero_si256(); R];
                for q in 0..4 {
                    let mut lo_sum = [_mm256_setzero_si256(); R];
                    let mut hi_sum = [_mm256_setzero_si256(); R];
                    for t in 0..8 {
                        let v = load(Q4_K_QUANTS + 64 * (8 * q + t));
                        let lo = _mm256_and_si256(v, low_nibble);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low_nibble);
                        for c in 0..R {
                            let xq = x[c].get_unchecked(b).qs.as_ptr().add(64 * q + 4 * t);
                            lo_sum[c] = _mm256_add_epi16(lo_sum[c], _mm256_maddubs_epi16(lo, broadcast4(xq)));
                            hi_sum[c] = _mm256_add_epi16(hi_sum[c], _mm256_maddubs_epi16(hi, broadcast4(xq.add(32))));
                        }
                    }
                    let (s0, s1) = (scale_of(2 * q), scale_of(2 * q + 1));
                    for c in 0..R {
                        let scaled =
                            _mm256_add_epi32(_mm256_madd_epi16(lo_sum[c], s0), _mm256_madd_epi16(hi_sum[c], s1));
                        sumi[c] = _mm256_add_epi32(sumi[c], scaled);
                    }
                }
                // The mins as pairs of 16-bit values (sub-blocks 0 and 2, 1 and 3, 4 and 6, 5 and 7 of each row).
                let mins = [
                    _mm256_and_si256(mins_lo, words),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(mins_lo), words),
                    _mm256_and_si256(mins_hi, words),
                    _mm256_and_si256(_mm256_srli_epi32::<8>(mins_hi), words),
                ];
                for c in 0..R {
                    let y = x[c].get_unchecked(b);
                    let pair = pairs.get_unchecked(c * blocks + b);
                    let mut summ = _mm256_madd_epi16(mins[0], _mm256_set1_epi32(pair[0]));
                    for i in 1..4 {
                        summ = _mm256_add_epi32(summ, _mm256_madd_epi16(mins[i], _mm256_set1_epi32(pair[i])));
                    }
                    let dx = _mm256_set1_ps(y.d);
                    acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[c]), _mm256_mul_ps(d, dx), acc[c][h]);
                    acc[c][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_mul_ps(dmin, dx), acc[c][h]);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            for (h, acc) in acc.into_iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(LANES * g + 8 * h), acc);
            }
        }
    }
}
