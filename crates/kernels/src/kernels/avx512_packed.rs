//! AVX-512 VNNI kernels for weights in the kernels' own layouts ([`crate::packed`]).
//!
//! q4_0 interleaved by 16 rows: one 64-byte load brings four quant bytes of each of 16 rows (a row per 32-bit
//! lane); its low and high nibbles meet broadcasts of the matching four activation values in two `vpdpbusd`, so each
//! lane sums its own row and nothing is reduced across lanes. Per block of 16 rows (288 bytes) that is 4 loads, 4
//! `vpand`, 4 `vgf2p8affineqb` and 8 `vpdpbusd` (each with a broadcast load of activations), then one load and
//! conversion of 16 scales and one multiply, convert and fused multiply-add per activation row: about 27
//! instructions, where the GGUF-layout row kernel (`avx512::rows_q4_0_quads`) needs about 25 for 72 bytes.
//!
//! That matters because one-row decoding on Zen 4 is bound by instructions, not memory: `kernel_bench --types
//! q4_0 --threads 1,2` (13824x5120, weights from DRAM) measured the GGUF-layout kernel at 12.6–16 GB/s a thread
//! against a read roof of 24.3 (1 thread) and 45.9 GB/s (2 threads) by `bench/read_bandwidth.c`; figures for this
//! kernel are in `crates/kernels/README.md`.
//!
//! A few activation rows at once (a server's batch, a speculative verify pass) share each unpacked vector: per
//! row only the `vpdpbusd`s and the per-block scaling are repeated, and each row's result is bit for bit what it
//! gets alone (the same operations in the same order on its own registers), and what `scalar::groups_q4_0` gives.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::kernels::avx512::prefetch_ahead;
use crate::packed::quant_bytes;
use crate::types::{GgmlType, QK};

/// Rows per group ([`crate::packed::GROUP_ROWS`]), one per 32-bit lane.
const LANES: usize = 16;

/// `out[c][16g + r] = dot(row r of group g, x[c])` for the whole groups of interleaved q4_0 rows in `w` (rows of
/// `row_bytes` in GGUF's layout) and `R` activation rows (pair-interleaved, `Q8_0Row::qs`).
///
/// # Safety
/// AVX-512 with VNNI and GFNI must be available; `w` is a whole number of groups; each `out[c]` holds 16 outputs
/// per group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c,fma")]
pub(crate) unsafe fn groups_q4_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    const QUANTS: usize = quant_bytes(GgmlType::Q4_0);
    const PAIR: usize = 2 * LANES * GgmlType::Q4_0.block_bytes();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / GgmlType::Q4_0.block_bytes();
    let low_nibble = _mm512_set1_epi8(0x0F);
    let high_nibble = _mm512_set1_epi8(0xF0u8 as i8);
    let end = w.as_ptr_range().end;
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let p = group.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for pair in 0..blocks.div_ceil(2) {
            let base = p.add(pair * PAIR);
            prefetch_ahead::<9, PF>(base, end);
            let in_pair = (blocks - 2 * pair).min(2);
            for second in 0..in_pair {
                let j = 2 * pair + second;
                let quants = base.add(second * QUANTS);
                // Block j's activations: values 4t..4t + 4 at 8t + 4·second of the pair, 16 + 4t.. 32 bytes on.
                let xq: [*const u8; R] =
                    std::array::from_fn(|c| x[c].qs.as_ptr().add(pair * 2 * QK + 4 * second).cast());
                // The stored nibbles are q + 8: each sum starts at the block's -8 Σx.
                // Two chains of sums per activation row, the low nibbles' and the high nibbles': each `vpdpbusd`
                // waits for the one before it in its chain, and one chain of eight left one-row decoding bound by
                // that latency (39 against 50 GB/s with the weights in cache, `kernel_bench --hot 1`, Zen 4).
                let mut isum_lo: [__m512i; R] = std::array::from_fn(|c| _mm512_set1_epi32(*x[c].bias.get_unchecked(j)));
                let mut isum_hi = [_mm512_setzero_si512(); R];
                for t in 0..4 {
                    let v = _mm512_loadu_si512(quants.add(64 * t).cast());
                    let lo = _mm512_and_si512(v, low_nibble);
                    // The high nibbles stay where they are, 16 times their value: a `vpandq` instead of a shift or a
                    // `vgf2p8affineqb`, which competes with `vpdpbusd` for the same two pipes on Zen 4. The sum is
                    // divided by 16 again (exactly: it is a multiple of 16) once per block.
                    let hi = _mm512_and_si512(v, high_nibble);
                    for c in 0..R {
                        let x_lo = _mm512_set1_epi32(std::ptr::read_unaligned(xq[c].add(8 * t).cast::<i32>()));
                        let x_hi = _mm512_set1_epi32(std::ptr::read_unaligned(xq[c].add(QK + 8 * t).cast::<i32>()));
                        isum_lo[c] = _mm512_dpbusd_epi32(isum_lo[c], lo, x_lo);
                        isum_hi[c] = _mm512_dpbusd_epi32(isum_hi[c], hi, x_hi);
                    }
                }
                let isum: [__m512i; R] =
                    std::array::from_fn(|c| _mm512_add_epi32(isum_lo[c], _mm512_srai_epi32::<4>(isum_hi[c])));
                let scales = base.add(in_pair * QUANTS + second * 2 * LANES);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.cast()));
                for c in 0..R {
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x[c].d.get_unchecked(j)));
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), scale, acc[c]);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr().add(LANES * g), acc);
        }
    }
}

/// [`groups_q4_0`] for interleaved q8_0 rows: eight vectors of stored `q + 128` per block, each against a broadcast
/// of four activation values, in two chains of sums.
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
    const QUANTS: usize = quant_bytes(GgmlType::Q8_0);
    const PAIR: usize = 2 * LANES * GgmlType::Q8_0.block_bytes();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / GgmlType::Q8_0.block_bytes();
    let end = w.as_ptr_range().end;
    for (g, group) in w.chunks_exact(LANES * row_bytes).enumerate() {
        let p = group.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for pair in 0..blocks.div_ceil(2) {
            let base = p.add(pair * PAIR);
            prefetch_ahead::<17, PF>(base, end);
            let in_pair = (blocks - 2 * pair).min(2);
            for second in 0..in_pair {
                let j = 2 * pair + second;
                let quants = base.add(second * QUANTS);
                // Block j's activations: values 4t..4t + 4 at 8t + 4·second of the pair.
                let xq: [*const u8; R] =
                    std::array::from_fn(|c| x[c].qs.as_ptr().add(pair * 2 * QK + 4 * second).cast());
                // The stored quants are q + 128: each sum starts at the block's -128 Σx.
                let mut even: [__m512i; R] = std::array::from_fn(|c| _mm512_set1_epi32(*x[c].bias.get_unchecked(j)));
                let mut odd = [_mm512_setzero_si512(); R];
                for t in (0..8).step_by(2) {
                    let (v0, v1) = (
                        _mm512_loadu_si512(quants.add(64 * t).cast()),
                        _mm512_loadu_si512(quants.add(64 * t + 64).cast()),
                    );
                    for c in 0..R {
                        let x0 = _mm512_set1_epi32(std::ptr::read_unaligned(xq[c].add(8 * t).cast::<i32>()));
                        let x1 = _mm512_set1_epi32(std::ptr::read_unaligned(xq[c].add(8 * t + 8).cast::<i32>()));
                        even[c] = _mm512_dpbusd_epi32(even[c], v0, x0);
                        odd[c] = _mm512_dpbusd_epi32(odd[c], v1, x1);
                    }
                }
                let scales = base.add(in_pair * QUANTS + second * 2 * LANES);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.cast()));
                for c in 0..R {
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x[c].d.get_unchecked(j)));
                    let isum = _mm512_add_epi32(even[c], odd[c]);
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[c]);
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr().add(LANES * g), acc);
        }
    }
}
