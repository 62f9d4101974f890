//! AVX-512 multi-row kernels: a run of weight rows against `R` activation rows at once (`R` up to
//! `MAX_MULTI_ROWS`), for batches too small for the GEMM (a server decoding a few sequences together).
//!
//! The one-row kernels (`avx512`) spend about half their instructions loading and unpacking weights; run once per
//! activation row, that work is repeated for every row. Here each weight block is loaded and unpacked once and
//! then multiplied with every activation row, each row with its own accumulators.
//!
//! Bit for bit the one-row result: for every activation row, each kernel here does the integer sums and the float
//! operations of its one-row counterpart in the same order (only the unpacking, which is exact, is shared), so an
//! output does not depend on how many rows were multiplied together, nor on the thread count.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::{scales_mins_k4_words, BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8K, BlockQ8_0};
use crate::kernels::avx512::{
    dword_spread_indices, half_bits, load_indices, low_then_high_nibbles, pair_biases, pair_scales, prefetch_ahead,
    q8_0_pair_indices, Q6kUnpack, A_AND_C_OR_B, GF2_HIGH_NIBBLE, LOW_BYTE_OF_DWORD,
};
use crate::kernels::x86::{half_at, reduce_add_256};
use crate::types::QK;

/// q4_0 against `R` activation rows in the quad layout (`Q8_0Row::natural`, which must be filled): as
/// `avx512::rows_q4_0_quads`, four blocks per step, the nibbles unpacked once per step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q4_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    debug_assert!(x.iter().all(|x| !x.natural.is_empty()) && out.len() == R);
    let blocks = row_bytes / BLOCK_BYTES;
    let full = blocks / 4;
    let end = w.as_ptr_range().end;
    for (i, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..full {
            let b = p.add(4 * BLOCK_BYTES * g);
            prefetch_ahead::<2, PF>(b, end);
            q4_0_quad(&mut acc, b, x, g);
        }
        if full * 4 < blocks {
            let mut tail = [0u8; 4 * BLOCK_BYTES];
            tail[..row_bytes - 4 * BLOCK_BYTES * full].copy_from_slice(&row[4 * BLOCK_BYTES * full..]);
            q4_0_quad(&mut acc, tail.as_ptr(), x, full);
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            o[i] = _mm512_reduce_add_ps(acc);
        }
    }
}

/// `acc[c]` plus the products of the four q4_0 blocks at `b` with quad `g` of activation row `c`, for each `c`: the
/// operations of `avx512::q4_0_quad` per row, the loads, nibble unpacking and weight scales shared.
///
/// # Safety
/// AVX-512 as enabled below; `b` valid for 72 bytes; every `x[c].natural*` holds quad `g`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c,fma")]
unsafe fn q4_0_quad<const R: usize>(acc: &mut [__m512; R], b: *const u8, x: &[Q8_0Row; R], g: usize) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let ab = _mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(b.add(2).cast())),
        _mm_loadu_si128(b.add(BLOCK_BYTES + 2).cast()),
    );
    let cd = _mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(b.add(2 * BLOCK_BYTES + 2).cast())),
        _mm_loadu_si128(b.add(3 * BLOCK_BYTES + 2).cast()),
    );
    let packed = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ab), cd);
    let low = _mm512_and_si512(packed, _mm512_set1_epi8(0x0F));
    let high = _mm512_gf2p8affine_epi64_epi8::<0>(packed, _mm512_set1_epi64(GF2_HIGH_NIBBLE));
    let dw = half_bits(b)
        | half_bits(b.add(BLOCK_BYTES)) << 16
        | half_bits(b.add(2 * BLOCK_BYTES)) << 32
        | half_bits(b.add(3 * BLOCK_BYTES)) << 48;
    let dw = _mm_cvtph_ps(_mm_cvtsi64_si128(dw as i64));
    for (acc, x) in acc.iter_mut().zip(x) {
        let xg = x.natural.as_ptr().add(4 * QK * g);
        let bias4 = _mm512_castsi128_si512(_mm_loadu_si128(x.natural_bias.as_ptr().add(4 * g).cast()));
        let isum = _mm512_dpbusd_epi32(
            _mm512_maskz_permutexvar_epi32(0x1111, spread, bias4),
            low,
            _mm512_loadu_si512(xg.cast()),
        );
        let isum = _mm512_dpbusd_epi32(isum, high, _mm512_loadu_si512(xg.add(2 * QK).cast()));
        let d = _mm_mul_ps(dw, _mm_loadu_ps(x.natural_d.as_ptr().add(4 * g)));
        let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
    }
}

/// q8_0 against `R` activation rows: as `avx512::rows_q8_0`, a pair of blocks per step, loaded and put in the
/// pair-interleaved order once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q8_0<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[Q8_0Row; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ8_0>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let quant_idx = load_indices(&q8_0_pair_indices());
    let sign_flip = _mm512_set1_epi8(-128);
    let end = w.as_ptr_range().end;
    for (i, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * pair * BLOCK_BYTES);
            prefetch_ahead::<2, PF>(first, end);
            let (second_quants, second_scale) = if 2 * pair + 1 < blocks {
                (
                    _mm256_loadu_si256(first.add(BLOCK_BYTES + 2).cast()),
                    u16::from_le_bytes([*first.add(BLOCK_BYTES), *first.add(BLOCK_BYTES + 1)]),
                )
            } else {
                (_mm256_setzero_si256(), 0)
            };
            let quants =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(first.add(2).cast())), second_quants);
            let q = _mm512_xor_si512(_mm512_permutexvar_epi8(quant_idx, quants), sign_flip);
            let scales = u16::from_le_bytes([*first, *first.add(1)]) as u32 | (second_scale as u32) << 16;
            let dw = _mm512_cvtph_ps(_mm256_set1_epi32(scales as i32));
            for (acc, x) in acc.iter_mut().zip(x) {
                let isum = _mm512_dpbusd_epi32(
                    pair_biases(x.bias.as_ptr().add(2 * pair)),
                    q,
                    _mm512_loadu_si512(x.qs.as_ptr().add(pair * 2 * QK).cast()),
                );
                let scale = _mm512_mul_ps(dw, pair_scales(x.d.as_ptr().add(2 * pair)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            o[i] = _mm512_reduce_add_ps(acc);
        }
    }
}

/// q4_K against `R` activation rows: as `avx512::rows_q4_k`, one super-block per step, its nibbles, group scales
/// and minimums unpacked once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q4_k<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let nibbles = low_then_high_nibbles();
    let spread: [__m512i; 4] = std::array::from_fn(|c| load_indices(&dword_spread_indices(2 * c, 8)));
    let min_idx = {
        let mut idx = [0u8; 32];
        for (i, v) in idx.iter_mut().enumerate() {
            *v = (8 + i / 4) as u8;
        }
        _mm256_loadu_si256(idx.as_ptr().cast())
    };
    let end = w.as_ptr_range().end;
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_mins = [_mm256_setzero_ps(); R];
        for i in 0..blocks {
            let b = p.add(i * BLOCK_BYTES);
            prefetch_ahead::<3, PF>(b, end);
            let (scales, mins) = scales_mins_k4_words(&*b.add(4).cast::<[u8; 12]>());
            let scale_bytes = _mm512_castsi128_si512(_mm_set_epi64x(mins as i64, scales as i64));
            let q: [__m512i; 4] = std::array::from_fn(|c| {
                let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(16 + 32 * c).cast()));
                _mm512_gf2p8affine_epi64_epi8::<0>(packed, nibbles)
            });
            let group_scales: [__m512i; 4] =
                std::array::from_fn(|c| _mm512_maskz_permutexvar_epi8(LOW_BYTE_OF_DWORD, spread[c], scale_bytes));
            let min_words = _mm256_maskz_permutexvar_epi8(0x5555_5555, min_idx, _mm512_castsi512_si256(scale_bytes));
            let (dh, dminh) = (half_at(b), half_at(b.add(2)));
            for ((acc, acc_mins), x) in acc.iter_mut().zip(acc_mins.iter_mut()).zip(x) {
                let y = &x[i];
                let mut isum = _mm512_setzero_si512();
                for c in 0..4 {
                    let dot = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        q[c],
                        _mm512_loadu_si512(y.qs.as_ptr().add(64 * c).cast()),
                    );
                    isum = _mm512_add_epi32(isum, _mm512_madd_epi16(dot, group_scales[c]));
                }
                let imins = _mm256_madd_epi16(_mm256_loadu_si256(y.bsums.as_ptr().cast()), min_words);
                let d = dh * y.d;
                let dmin = dminh * y.d;
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d), *acc);
                *acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imins), _mm256_set1_ps(dmin), *acc_mins);
            }
        }
        for ((o, acc), acc_mins) in out.iter_mut().zip(acc).zip(acc_mins) {
            o[r] = _mm512_reduce_add_ps(acc) - reduce_add_256(acc_mins);
        }
    }
}

/// q6_K against `R` activation rows: as `avx512::rows_q6_k`, one super-block per step, its 6-bit values and group
/// scales unpacked once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q6_k<const R: usize, const PF: u8>(
    w: &[u8],
    row_bytes: usize,
    x: &[&[BlockQ8K]; R],
    out: &mut [&mut [f32]],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ6K>();
    debug_assert_eq!(out.len(), R);
    let blocks = row_bytes / BLOCK_BYTES;
    let Q6kUnpack { low_nibble, high_nibble, top_bits_first, top_bits_second, spread } = Q6kUnpack::new();
    let end = w.as_ptr_range().end;
    for (r, row) in w.chunks_exact(row_bytes).enumerate() {
        let p = row.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for i in 0..blocks {
            let b = p.add(i * BLOCK_BYTES);
            prefetch_ahead::<4, PF>(b, end);
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
            let scales_wide = _mm512_zextsi256_si512(scales16);
            // Values 64u .. 64u + 64 in q[u] (stored as q + 32), as the one-row kernel orders them.
            let mut q = [_mm512_setzero_si512(); 4];
            for half in 0..2 {
                let ql = _mm512_loadu_si512(b.add(64 * half).cast());
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * half).cast()));
                q[2 * half] = _mm512_ternarylogic_epi32::<{ A_AND_C_OR_B }>(
                    ql,
                    _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_bits_first),
                    low_nibble,
                );
                q[2 * half + 1] = _mm512_or_si512(
                    _mm512_gf2p8affine_epi64_epi8::<0>(ql, high_nibble),
                    _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_bits_second),
                );
            }
            let group_scales: [__m512i; 4] =
                std::array::from_fn(|u| _mm512_maskz_permutexvar_epi16(0x5555_5555, spread[u], scales_wide));
            let dh = half_at(b.add(208));
            for (acc, x) in acc.iter_mut().zip(x) {
                let y = &x[i];
                let mut isum = _mm512_setzero_si512();
                for u in 0..4 {
                    let dot = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        q[u],
                        _mm512_loadu_si512(y.qs.as_ptr().add(64 * u).cast()),
                    );
                    isum = _mm512_add_epi32(isum, _mm512_madd_epi16(dot, group_scales[u]));
                }
                let offset = _mm256_madd_epi16(scales16, _mm256_loadu_si256(y.bsums.as_ptr().cast()));
                isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(offset)));
                let d = dh * y.d;
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d), *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            o[r] = _mm512_reduce_add_ps(acc);
        }
    }
}
