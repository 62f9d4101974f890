//! AVX-512 VNNI kernels for weights in the kernels' own layouts ([`crate::packed`]).
//!
//! q4_0 interleaved by 16 rows: one 64-byte load brings four quant bytes of each of 16 rows (a row per 32-bit
//! lane); its low and high nibbles (each one `vpandq`: the high ones stay in place, 16 times their value, and the
//! block's sum is divided by 16 once) meet broadcasts of the matching four activation values in two `vpdpbusd`, so
//! each lane sums its own row and nothing is reduced across lanes. Per block of 16 rows (288 bytes) that is 4
//! loads, 8 `vpandq` and 8 `vpdpbusd` (each with a broadcast of activations as its memory operand), then one load
//! and conversion of 16 scales and a handful of instructions per activation row: about 27 instructions, where the
//! GGUF-layout row kernel (`avx512::rows_q4_0_quads`) needs about 25 for 72 bytes. q8_0 needs no unpacking at all;
//! q4_K adds the unpacking of its 6-bit scales and mins, for 16 rows at once; q6_K's values are laid out so that
//! three of four are one mask each ([`q6_k_group_values`]).
//!
//! That matters because one-row decoding on Zen 4 and on the Xeons is bound by instructions, not memory: on Zen 4
//! the GGUF-layout q4_0 kernel read 12.6–16 GB/s a thread from memory against a read roof of 24–27 GB/s, and the
//! interleaved one 20–23 (bench/RESULTS.md, "q4_0 rows interleaved by 16, Zen 4").
//!
//! A few activation rows at once (a server's batch, a speculative verify pass) share each unpacked vector: per
//! row only the `vpdpbusd`s and the per-block scaling are repeated, and each row's result is bit for bit what it
//! gets alone (the same operations in the same order on its own registers), and what the scalar references
//! (`scalar::groups`, `scalar::groups_q4_k`) give.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::BlockQ8K;
use crate::kernels::avx512::{prefetch_ahead_by, A_AND_C_OR_B, PACKED_PREFETCH_DISTANCE};
use crate::packed::{
    q4_k_min_pairs, q6_k_offsets, quant_bytes, Q4_K_D, Q4_K_DMIN, Q4_K_GROUP_BYTES, Q4_K_QUANTS, Q4_K_SCALES,
    Q6_K_GROUP_QUANTS, Q6_K_QUANTS, Q6_K_SCALES,
};
use crate::tuning::PREFETCH_OFF;
use crate::types::{GgmlType, QK};

/// How far ahead the interleaved q4_K kernel prefetches where the tuning row gives it a hint (see
/// [`groups_q4_k`]).
const Q4_K_PREFETCH_DISTANCE: usize = 1 << 10;

/// Rows per group ([`crate::packed::GROUP_ROWS`]), one per 32-bit lane.
const LANES: usize = 16;

/// `out[c][16g + r] = dot(row r of group g, x[c])` for the whole groups of interleaved q4_0 rows in `w` (rows of
/// `row_bytes` in GGUF's layout) and `R` activation rows (pair-interleaved, `Q8_0Row::qs`).
///
/// # Safety
/// AVX-512 with VNNI must be available; `w` is a whole number of groups; each `out[c]` holds 16 outputs per group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn groups_q4_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    groups::<R, PF, false>(w, row_bytes, x, out)
}

/// [`groups_q4_0`] for interleaved q8_0 rows: eight vectors of stored `q + 128` per block, nothing to unpack.
///
/// # Safety
/// As [`groups_q4_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn groups_q8_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    groups::<R, PF, true>(w, row_bytes, x, out)
}

/// The kernel of [`groups_q4_0`] (`Q8` false) and [`groups_q8_0`] (`Q8` true): they differ only in how a block's
/// vectors become its integer sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
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
    let low_nibble = _mm512_set1_epi8(0x0F);
    let high_nibble = _mm512_set1_epi8(0xF0u8 as i8);
    let end = w.as_ptr_range().end;
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let p = group.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
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
                let xq: [*const u8; R] =
                    std::array::from_fn(|c| x[c].qs.as_ptr().add(pair * 2 * QK + 4 * second).cast());
                let x4 = |c: usize, at: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xq[c].add(at).cast::<i32>()));
                // The stored values are q + 8 (q4_0) or q + 128 (q8_0): each sum starts at the block's bias.
                // Two chains of sums per activation row: each `vpdpbusd` waits for the one before it in its
                // chain, and one chain of eight left one-row decoding bound by that latency (39 against 50 GB/s
                // with the weights in cache, `kernel_bench --hot 1`, Zen 4).
                let mut first: [__m512i; R] = std::array::from_fn(|c| _mm512_set1_epi32(*x[c].bias.get_unchecked(j)));
                let mut second_chain = [_mm512_setzero_si512(); R];
                if Q8 {
                    for t in (0..8).step_by(2) {
                        let v0 = _mm512_loadu_si512(quants.add(64 * t).cast());
                        let v1 = _mm512_loadu_si512(quants.add(64 * t + 64).cast());
                        for c in 0..R {
                            first[c] = _mm512_dpbusd_epi32(first[c], v0, x4(c, 8 * t));
                            second_chain[c] = _mm512_dpbusd_epi32(second_chain[c], v1, x4(c, 8 * t + 8));
                        }
                    }
                } else {
                    for t in 0..4 {
                        let v = _mm512_loadu_si512(quants.add(64 * t).cast());
                        let lo = _mm512_and_si512(v, low_nibble);
                        // The high nibbles stay where they are, 16 times their value: a `vpandq` instead of a
                        // shift or a `vgf2p8affineqb`, which competes with `vpdpbusd` for the same two pipes on
                        // Zen 4. Their sum is divided by 16 again (exactly: it is a multiple of 16) once per block.
                        let hi = _mm512_and_si512(v, high_nibble);
                        for c in 0..R {
                            first[c] = _mm512_dpbusd_epi32(first[c], lo, x4(c, 8 * t));
                            second_chain[c] = _mm512_dpbusd_epi32(second_chain[c], hi, x4(c, QK + 8 * t));
                        }
                    }
                    second_chain = second_chain.map(|s| _mm512_srai_epi32::<4>(s));
                }
                let scales = base.add(in_pair * quant_len + second * 2 * LANES);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.cast()));
                for c in 0..R {
                    let isum = _mm512_add_epi32(first[c], second_chain[c]);
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x[c].d.get_unchecked(j)));
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[c]);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr().add(LANES * g), acc);
        }
    }
}

/// Interleaved q4_K rows against `R` q8_K activation rows. Per super-block of 16 rows: the 6-bit scales and mins of
/// all 16 rows unpacked at once from their three vectors (as `blocks::scales_mins_k4_words` does for one row);
/// per quarter, eight vectors of quants whose low nibbles are sub-block `2q` and whose high nibbles (masked in
/// place, 16 times their value) are sub-block `2q + 1`, each against broadcasts of four activation values; each
/// sub-block's sum times its scale (`vpmulld`); the mins against the activations' sub-block sums by `vpdpwssd`
/// on pairs of 16-bit values; then the two scalings.
///
/// # Safety
/// As [`groups_q4_0`], with q8_K activations of the rows' length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn groups_q4_k<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / GgmlType::Q4_K.block_bytes();
    let (low_nibble, high_nibble) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
    let (low6, low4, top2) =
        (_mm512_set1_epi32(0x3f3f_3f3f), _mm512_set1_epi32(0x0f0f_0f0f), _mm512_set1_epi32(0x0303_0303));
    let (byte, words) = (_mm512_set1_epi32(0xFF), _mm512_set1_epi32(0x00FF_00FF));
    let end = w.as_ptr_range().end;
    // The activations' sub-block sums as pairs of 16-bit values, once per call rather than once per group of rows.
    let pairs = q4_k_min_pairs(x, blocks);
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let sb = group.as_ptr().add(b * Q4_K_GROUP_BYTES);
            // The hardware prefetcher does not follow this kernel's reads: it streamed 10.8 GB/s from memory on one
            // Zen 4 thread, against 59 in cache and 14–16 for GGUF's layout, and prefetching 32 KiB ahead made it
            // worse. A `prefetcht0` of the two super-blocks after the next, each line so requested twice, gave
            // 24.2 GB/s (one thread) and 31.7 (two) against 16.0 and 27.3 for GGUF's layout (`VICUNA_KERNELS_PACK=1
            // N=3 bench/layout_ab.sh q4_K`; a second run: 11.8 and 19.1 on one thread, 24.7 and 30.6 on two);
            // requesting each line once, 36 lines two, three, four or eight super-blocks ahead, gave 10–12. Why is
            // not understood (no performance counters in the VM), so Zen 4's row does not rewrite q4_K; Intel's does
            // (`tuning::PACKED_TYPES_XEON`). That scheme is kept where the tuning row gives the interleaved kernels no
            // hint of their own (Zen 4's, `PREFETCH_OFF`); with one (the Xeon's), each line is requested once,
            // `Q4_K_PREFETCH_DISTANCE` ahead, with that hint.
            if PF == PREFETCH_OFF {
                for line in 0..2 * Q4_K_GROUP_BYTES / 64 {
                    let at = sb.wrapping_add(2 * Q4_K_GROUP_BYTES + 64 * line);
                    if at < end {
                        _mm_prefetch::<_MM_HINT_T0>(at.cast());
                    }
                }
            } else {
                prefetch_ahead_by::<{ Q4_K_GROUP_BYTES / 64 }, PF, Q4_K_PREFETCH_DISTANCE>(sb, end);
            }
            // Scales and mins of the 16 rows: four bytes a lane in each of four words.
            let load = |at: usize| _mm512_loadu_si512(sb.add(at).cast());
            let (a, bw, c) = (load(Q4_K_SCALES), load(Q4_K_SCALES + 64), load(Q4_K_SCALES + 128));
            let scales_lo = _mm512_and_si512(a, low6);
            let scales_hi = _mm512_or_si512(
                _mm512_and_si512(c, low4),
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(a), top2)),
            );
            let mins_lo = _mm512_and_si512(bw, low6);
            let mins_hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<4>(c), low4),
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(bw), top2)),
            );
            let scale_of = |s: usize| {
                let word = if s < 4 { scales_lo } else { scales_hi };
                _mm512_and_si512(_mm512_srl_epi32(word, _mm_cvtsi32_si128(8 * (s % 4) as i32)), byte)
            };
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(Q4_K_D).cast()));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(Q4_K_DMIN).cast()));
            let mut sumi = [_mm512_setzero_si512(); R];
            for q in 0..4 {
                let mut lo_sum = [_mm512_setzero_si512(); R];
                let mut hi_sum = [_mm512_setzero_si512(); R];
                for t in 0..8 {
                    let v = load(Q4_K_QUANTS + 64 * (8 * q + t));
                    let (lo, hi) = (_mm512_and_si512(v, low_nibble), _mm512_and_si512(v, high_nibble));
                    for c in 0..R {
                        let xq = x[c].get_unchecked(b).qs.as_ptr().add(64 * q + 4 * t);
                        let x_lo = _mm512_set1_epi32(std::ptr::read_unaligned(xq.cast::<i32>()));
                        let x_hi = _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(32).cast::<i32>()));
                        lo_sum[c] = _mm512_dpbusd_epi32(lo_sum[c], lo, x_lo);
                        hi_sum[c] = _mm512_dpbusd_epi32(hi_sum[c], hi, x_hi);
                    }
                }
                let (s0, s1) = (scale_of(2 * q), scale_of(2 * q + 1));
                for c in 0..R {
                    let scaled = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo_sum[c], s0),
                        _mm512_mullo_epi32(_mm512_srai_epi32::<4>(hi_sum[c]), s1),
                    );
                    sumi[c] = _mm512_add_epi32(sumi[c], scaled);
                }
            }
            // The mins as pairs of 16-bit values (sub-blocks 0 and 2, 1 and 3, 4 and 6, 5 and 7 of each row).
            let mins = [
                _mm512_and_si512(mins_lo, words),
                _mm512_and_si512(_mm512_srli_epi32::<8>(mins_lo), words),
                _mm512_and_si512(mins_hi, words),
                _mm512_and_si512(_mm512_srli_epi32::<8>(mins_hi), words),
            ];
            for c in 0..R {
                let y = x[c].get_unchecked(b);
                let pair = pairs.get_unchecked(c * blocks + b);
                let mut summ = _mm512_dpwssd_epi32(_mm512_setzero_si512(), mins[0], _mm512_set1_epi32(pair[0]));
                summ = _mm512_dpwssd_epi32(summ, mins[1], _mm512_set1_epi32(pair[1]));
                summ = _mm512_dpwssd_epi32(summ, mins[2], _mm512_set1_epi32(pair[2]));
                summ = _mm512_dpwssd_epi32(summ, mins[3], _mm512_set1_epi32(pair[3]));
                let dx = _mm512_set1_ps(y.d);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[c]), _mm512_mul_ps(d, dx), acc[c]);
                acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dmin, dx), acc[c]);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr().add(LANES * g), acc);
        }
    }
}

/// The three values of a q6_K scale group's three vectors that need only a mask (`Sk & 63`: values `4k + i` of
/// each lane's group), and four times the fourth (values `12 + i`, its two-bit pieces from the top of each: see
/// [`crate::packed`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn q6_k_group_values(quants: *const u8) -> [__m512i; 4] {
    let (s0, s1, s2) = (
        _mm512_loadu_si512(quants.cast()),
        _mm512_loadu_si512(quants.add(64).cast()),
        _mm512_loadu_si512(quants.add(128).cast()),
    );
    let low6 = _mm512_set1_epi8(0x3F);
    // (S0 >> 4 & 12) | (S1 >> 2 & 48) | (S2 & 192): the shifts cross bytes, the masks keep each byte's own bits.
    let a = _mm512_and_si512(_mm512_srli_epi16::<4>(s0), _mm512_set1_epi8(0x0C));
    let ab = _mm512_ternarylogic_epi32::<{ A_AND_C_OR_B }>(_mm512_srli_epi16::<2>(s1), a, _mm512_set1_epi8(0x30));
    let four_times = _mm512_ternarylogic_epi32::<{ A_AND_C_OR_B }>(s2, ab, _mm512_set1_epi8(0xC0u8 as i8));
    [_mm512_and_si512(s0, low6), _mm512_and_si512(s1, low6), _mm512_and_si512(s2, low6), four_times]
}

/// Interleaved q6_K rows against `R` q8_K activation rows. Per scale group of 16 rows: three values of four from
/// a mask each and four times the fourth from two shifts and three masks ([`q6_k_group_values`]); that fourth
/// meets its activations first, in a sum started at four times `-32 · Σ x` (the stored values are `q + 32`), which
/// is then divided by 4 and continued with the other three; the group's sum times its scales (widened from one
/// 16-byte load); per super-block one scaling by `d`.
///
/// # Safety
/// As [`groups_q4_0`], with q8_K activations of the rows' length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn groups_q6_k<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / GgmlType::Q6_K.block_bytes();
    let end = w.as_ptr_range().end;
    // Each group's starting sum, `4 · -32 · Σ x`, per activation row, super-block and group: once per call.
    let starts: Vec<i32> =
        (0..R * blocks * 16).map(|i| -128 * x[i / (16 * blocks)][i / 16 % blocks].bsums[i % 16] as i32).collect();
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let p = group.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let (body_at, d_at) = q6_k_offsets(blocks, b);
            let body = p.add(body_at);
            prefetch_ahead_by::<4, PF, PACKED_PREFETCH_DISTANCE>(body, end);
            let mut sumi = [_mm512_setzero_si512(); R];
            for s in 0..16 {
                let quants = body.add(Q6_K_QUANTS + s * Q6_K_GROUP_QUANTS);
                prefetch_ahead_by::<3, PF, PACKED_PREFETCH_DISTANCE>(quants, end);
                let [v0, v1, v2, v3x4] = q6_k_group_values(quants);
                let scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(body.add(Q6_K_SCALES + 16 * s).cast()));
                for c in 0..R {
                    let y = x[c].get_unchecked(b).qs.as_ptr().add(16 * s);
                    let x4 = |i: usize| _mm512_set1_epi32(std::ptr::read_unaligned(y.add(4 * i).cast::<i32>()));
                    let start = _mm512_set1_epi32(*starts.get_unchecked((c * blocks + b) * 16 + s));
                    let mut sum = _mm512_srai_epi32::<2>(_mm512_dpbusd_epi32(start, v3x4, x4(3)));
                    sum = _mm512_dpbusd_epi32(sum, v0, x4(0));
                    sum = _mm512_dpbusd_epi32(sum, v1, x4(1));
                    sum = _mm512_dpbusd_epi32(sum, v2, x4(2));
                    sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(sum, scales));
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d_at).cast()));
            for c in 0..R {
                let dx = _mm512_set1_ps(x[c].get_unchecked(b).d);
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[c]), _mm512_mul_ps(d, dx), acc[c]);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr().add(LANES * g), acc);
        }
    }
}
