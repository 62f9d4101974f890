//! AVX-512 row kernels (VNNI `vpdpbusd` for the integer dots, GFNI `vgf2p8affineqb` and VBMI `vpermb` to unpack
//! the packed weights).
//!
//! Decoding streams every weight byte once per token, so these kernels are built to keep up with memory: 64 weights
//! are unpacked with one or two instructions, their integer dot is one `vpdpbusd`, loads avoid straddling cache
//! lines where they can, and the activation-side values (scales, sums) were laid out by `acts` so that they are
//! plain loads.

use std::arch::x86_64::*;

use crate::acts::Q8_0Row;
use crate::blocks::{scales_mins_k4_words, BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8K, BlockQ8_0};
use crate::kernels::x86::{half_at, reduce_add_256};
use crate::tuning::{PREFETCH_NTA, PREFETCH_T0};
use crate::types::QK;

/// An 8×8 bit matrix for `vgf2p8affineqb`: output bit `i` of each byte is input bit `sources[i]`, or 0 where
/// `sources[i]` is negative. (The instruction computes output bit `i` as the parity of `input & matrix.byte[7 - i]`.)
pub(crate) const fn gf2_bit_select(sources: [i8; 8]) -> i64 {
    let mut matrix = 0u64;
    let mut i = 0;
    while i < 8 {
        if sources[i] >= 0 {
            matrix |= (1u64 << sources[i]) << (8 * (7 - i));
        }
        i += 1;
    }
    matrix as i64
}

/// Keeps the low nibble of each byte.
pub(crate) const GF2_LOW_NIBBLE: i64 = gf2_bit_select([0, 1, 2, 3, -1, -1, -1, -1]);
/// Moves the high nibble of each byte to the low nibble.
pub(crate) const GF2_HIGH_NIBBLE: i64 = gf2_bit_select([4, 5, 6, 7, -1, -1, -1, -1]);
/// Bits `s, s + 1` of each byte to bits 4, 5 (the top two bits of a 6-bit q6_K value), others cleared.
pub(crate) const fn gf2_two_bits_to_4(s: i8) -> i64 {
    gf2_bit_select([-1, -1, -1, -1, s, s + 1, -1, -1])
}

/// Per-qword matrices: low nibbles in the first 256 bits, high nibbles in the second.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn low_then_high_nibbles() -> __m512i {
    _mm512_set_epi64(
        GF2_HIGH_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_LOW_NIBBLE,
    )
}

/// `vpermb` indices gathering the nibble bytes of a pair of q4_0 blocks (as [`load_q4_0_pair`] lays them out) into
/// the pair-interleaved order of `ActsQ8_0`: output dword `p` holds values `4 * (p / 2) ..` of block `p % 2`, i.e.
/// the low nibbles of bytes `4 * (p / 2) ..` for `p < 8` and the high nibbles of bytes `4 * (p / 2 - 4) ..` after.
const fn q4_0_pair_indices() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (p, i) = (o / 4, o % 4);
        let (block, group) = (p % 2, p / 2);
        let first_nibble_byte = if block == 0 { 2 } else { 32 };
        idx[o] = (first_nibble_byte + 4 * (group % 4) + i) as u8;
        o += 1;
    }
    idx
}

/// The 36 bytes of a pair of q4_0 blocks at `p`: bytes 0..32 of the pair in bytes 0..32 of the vector, the second
/// block's 16 nibble bytes (pair bytes 20..36) in bytes 32..48.
///
/// Two loads of 32 and 16 bytes rather than one of 64: at a 36-byte stride, 64-byte loads nearly always straddle
/// two cache lines, which costs more than the extra load. A pair with only one block (`full == false`, at the end
/// of a row of odd length) is loaded with masks, so nothing past its 18 bytes is touched.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn load_q4_0_pair(p: *const u8, full: bool) -> __m512i {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    if full {
        let head = _mm512_castsi256_si512(_mm256_loadu_si256(p.cast()));
        _mm512_inserti32x4::<2>(head, _mm_loadu_si128(p.add(BLOCK_BYTES + 2).cast()))
    } else {
        _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8((1 << BLOCK_BYTES) - 1, p.cast()))
    }
}

/// `vpermb` indices putting the two f16 scales of a q4_0 pair (bytes 0..2 and 18..20) in alternate words.
const fn pair_scale_indices(second_block_offset: usize) -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut w = 0;
    while w < 32 {
        let base = if w % 2 == 0 { 0 } else { second_block_offset };
        idx[2 * w] = base as u8;
        idx[2 * w + 1] = (base + 1) as u8;
        w += 1;
    }
    idx
}

/// `vpermb` indices taking the quants of two q8_0 blocks (the first block's in bytes 0..32, the second's in
/// 32..64) into the pair-interleaved order.
pub(crate) const fn q8_0_pair_indices() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut o = 0;
    while o < 64 {
        let (p, i) = (o / 4, o % 4);
        let (block, group) = (p % 2, p / 2);
        idx[o] = (32 * block + 4 * group + i) as u8;
        o += 1;
    }
    idx
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn load_indices(idx: &[u8; 64]) -> __m512i {
    _mm512_loadu_si512(idx.as_ptr().cast())
}

/// The two activation scales of a pair, repeated over the eight even/odd lane pairs.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pair_scales(d: *const f32) -> __m512 {
    _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(d.cast::<f64>())))
}

/// The two activation biases of a pair in lanes 0 and 1, zeros elsewhere: added once per block.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pair_biases(bias: *const i32) -> __m512i {
    _mm512_zextsi128_si512(_mm_loadl_epi64(bias.cast()))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q4_0<const PF: u8>(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    if !x.natural.is_empty() {
        return rows_q4_0_quads::<PF>(w, row_bytes, x, out);
    }
    rows_q4_0_pairs(w, row_bytes, x, out)
}

/// How far ahead of the weights being multiplied the row kernels prefetch.
///
/// One core streaming weights with only the hardware prefetcher got ~21 GB/s on q8_0 rows of 13824 values and
/// ~29 GB/s on rows of 5120; prefetching 32 KiB ahead, 27–37 and 33–38 GB/s, and q4_0, q4_K and q6_K gained as
/// much (kernel_bench, one thread, the `cpu` column, Zen 4). 16 and 64 KiB did about as well, 2–4 KiB little, and
/// `prefetcht0` 0.25–4 KiB ahead made things slower. Which hint is per CPU: [`crate::tuning::Prefetch`]. 16 KiB
/// since a Xeon with AMX (family 6 model 167, `prefetcht0`; kernel_bench --threads 1 --shapes 13824x5120, weights
/// from DRAM, two alternated rounds): q4_0 11.4–11.6 GB/s against 10.9 at 32 KiB, q8_0 13.7–13.8 against
/// 12.8–13.1, q6_K 10.1–10.6 against 9.3–9.5, q4_K 12.5–12.7 against 12.5–13.0; the GEMM's unpacking (same
/// distance) 1–3% slower, within the noise. Not remeasured on Zen 4.
const PREFETCH_DISTANCE: usize = 16 << 10;

/// How far ahead the kernels for the kernels' own layouts ([`crate::packed`]) prefetch: much nearer. Their weights
/// lie in huge pages, where the hardware prefetcher streams on past every 4 KiB, and a software prefetch 16 KiB
/// ahead only competes with it. On a Xeon with AMX (family 6 model 167, `prefetcht0`, the only hint any CPU's row
/// gives these kernels; `kernel_bench --types q4_0,q8_0 --threads 1,2 --shapes 13824x5120 --batch 1`, weights from
/// DRAM, two rounds, GB/s at 1 / 2 / 3 / 4 / 6 / 16 KiB): q4_0 one thread 13.5 / 14.0 / 13.8 / 13.0 / 12.0 / 11.9,
/// two threads 26.2 / 27.3 / 26.7 / 24.3 / 24.0 / 19–23; q8_0 one thread 16.2 / 16.0 / 15.1 / 14.3 / 14.6 / 14.1,
/// two 30.4 / 30.4 / 25.3 / 23 / 28.4 / 28.6. The AVX2 kernels (`--isa avx2`, one thread, 2 against 16 KiB): q4_0
/// 14.6–15.2 against 10.2–10.5, q8_0 15.5–16.5 against 11.3–11.8, q4_K 12.2–12.6 against 9.3–10.0. The whole 7b
/// q4_0 model (`vicuna bench -n 32`): tg 3.24–3.42 against 2.85–3.03 tokens/s on one thread.
pub(crate) const PACKED_PREFETCH_DISTANCE: usize = 2 << 10;

/// Prefetches `LINES` cache lines from [`PREFETCH_DISTANCE`] bytes past `p`: [`prefetch_ahead_by`] for the row
/// kernels of GGUF's layout.
#[inline]
#[target_feature(enable = "sse")]
pub(crate) unsafe fn prefetch_ahead<const LINES: usize, const PF: u8>(p: *const u8, end: *const u8) {
    prefetch_ahead_by::<LINES, PF, PREFETCH_DISTANCE>(p, end)
}

/// Prefetches `LINES` cache lines from `AHEAD` bytes past `p`, if that is before `end` (the end of the weights the
/// call was given: past it lie rows another thread may be multiplying, or nothing), with the hint whose
/// [`Prefetch::tag`](crate::tuning::Prefetch) is `PF` (none for `Off`).
#[inline]
#[target_feature(enable = "sse")]
pub(crate) unsafe fn prefetch_ahead_by<const LINES: usize, const PF: u8, const AHEAD: usize>(
    p: *const u8,
    end: *const u8,
) {
    let ahead = p.wrapping_add(AHEAD);
    if ahead < end {
        for line in 0..LINES {
            let at = ahead.wrapping_add(64 * line).cast();
            match PF {
                PREFETCH_NTA => _mm_prefetch::<_MM_HINT_NTA>(at),
                PREFETCH_T0 => _mm_prefetch::<_MM_HINT_T0>(at),
                _ => {}
            }
        }
    }
}

/// The f16 at `p`, as the low bits of a u64.
///
/// # Safety
/// `p` must be valid for reading two bytes.
#[inline]
pub(crate) unsafe fn half_bits(p: *const u8) -> u64 {
    std::ptr::read_unaligned(p.cast::<u16>()) as u64
}

/// q4_0 rows one at a time, four blocks per step: the 16 nibble bytes of block `j + b` fill 128-bit lane `b` of
/// one 512-bit vector, so the low nibbles (values 0..16 of each block) meet the activations' first halves of the
/// four blocks and the high nibbles (16..32) their second halves (the [`Q8_0Row::natural`] layout): two
/// `vpdpbusd` leave block `j + b`'s sum in dword lanes `4b..4b + 4`. The four f16 scales are gathered with scalar
/// loads, converted and multiplied with the activation scales as one f32x4 and spread over the lanes.
///
/// Per 72 bytes of weights that is about 11 vector instructions where pairs of blocks against the pair-interleaved
/// activations need 18. It matters: decoding one row at a time is compute bound on Zen 4 (the pair kernel ran at
/// ~33 GB/s with the weights in cache, barely above what one core streams from memory). Each row is still read
/// front to back, one stream, which the hardware prefetcher follows (four rows side by side it did not: 10 GB/s).
///
/// A last group of fewer than four blocks is copied to a zeroed buffer first: zero scales and nibbles add nothing.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c,fma")]
unsafe fn rows_q4_0_quads<const PF: u8>(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    let blocks = row_bytes / BLOCK_BYTES;
    let full = blocks / 4;
    let end = w.as_ptr_range().end;
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm512_setzero_ps();
        for g in 0..full {
            let b = p.add(4 * BLOCK_BYTES * g);
            prefetch_ahead::<2, PF>(b, end);
            acc = q4_0_quad(acc, b, x, g);
        }
        if full * 4 < blocks {
            let mut tail = [0u8; 4 * BLOCK_BYTES];
            tail[..row_bytes - 4 * BLOCK_BYTES * full].copy_from_slice(&row[4 * BLOCK_BYTES * full..]);
            acc = q4_0_quad(acc, tail.as_ptr(), x, full);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// `acc` plus the products of the four q4_0 blocks at `b` with activation quad `g` (see [`rows_q4_0_quads`]).
///
/// # Safety
/// AVX-512 as enabled below; `b` valid for 72 bytes; `x.natural*` hold quad `g`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c,fma")]
unsafe fn q4_0_quad(acc: __m512, b: *const u8, x: Q8_0Row, g: usize) -> __m512 {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    let low_nibble = _mm512_set1_epi8(0x0F);
    let high_nibble = _mm512_set1_epi64(GF2_HIGH_NIBBLE);
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let xq = x.natural.as_ptr();
    let ab = _mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(b.add(2).cast())),
        _mm_loadu_si128(b.add(BLOCK_BYTES + 2).cast()),
    );
    let cd = _mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(b.add(2 * BLOCK_BYTES + 2).cast())),
        _mm_loadu_si128(b.add(3 * BLOCK_BYTES + 2).cast()),
    );
    let packed = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ab), cd);
    let xg = xq.add(4 * QK * g);
    // The stored nibbles are q + 8: each block's sum starts at its -8 Σx (in lane 4b, zeros elsewhere); the
    // biases are stored four to a quad to keep the activations small (they compete with the weights for L1).
    let bias4 = _mm512_castsi128_si512(_mm_loadu_si128(x.natural_bias.as_ptr().add(4 * g).cast()));
    let isum = _mm512_dpbusd_epi32(
        _mm512_maskz_permutexvar_epi32(0x1111, spread, bias4),
        _mm512_and_si512(packed, low_nibble),
        _mm512_loadu_si512(xg.cast()),
    );
    let isum = _mm512_dpbusd_epi32(
        isum,
        _mm512_gf2p8affine_epi64_epi8::<0>(packed, high_nibble),
        _mm512_loadu_si512(xg.add(2 * QK).cast()),
    );
    let dw = half_bits(b)
        | half_bits(b.add(BLOCK_BYTES)) << 16
        | half_bits(b.add(2 * BLOCK_BYTES)) << 32
        | half_bits(b.add(3 * BLOCK_BYTES)) << 48;
    let d = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi64_si128(dw as i64)), _mm_loadu_ps(x.natural_d.as_ptr().add(4 * g)));
    let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d));
    _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc)
}

/// q4_0 rows one at a time, a pair of blocks per step, against the pair-interleaved activations.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
unsafe fn rows_q4_0_pairs(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    let blocks = row_bytes / BLOCK_BYTES;
    let nibble_idx = load_indices(&q4_0_pair_indices());
    let scale_idx = load_indices(&pair_scale_indices(BLOCK_BYTES));
    let nibbles = low_then_high_nibbles();
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm512_setzero_ps();
        for pair in 0..blocks.div_ceil(2) {
            let raw = load_q4_0_pair(p.add(pair * 2 * BLOCK_BYTES), 2 * pair + 1 < blocks);
            let q = _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_permutexvar_epi8(nibble_idx, raw), nibbles);
            let isum = _mm512_dpbusd_epi32(
                pair_biases(x.bias.as_ptr().add(2 * pair)),
                q,
                _mm512_loadu_si512(x.qs.as_ptr().add(pair * 2 * QK).cast()),
            );
            let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(scale_idx, raw)));
            let scale = _mm512_mul_ps(dw, pair_scales(x.d.as_ptr().add(2 * pair)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q8_0<const PF: u8>(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ8_0>();
    let blocks = row_bytes / BLOCK_BYTES;
    let quant_idx = load_indices(&q8_0_pair_indices());
    let sign_flip = _mm512_set1_epi8(-128);
    let end = w.as_ptr_range().end;
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm512_setzero_ps();
        for pair in 0..blocks.div_ceil(2) {
            let first = p.add(2 * pair * BLOCK_BYTES);
            prefetch_ahead::<2, PF>(first, end);
            // 32-byte loads of each block's quants (see `load_q4_0_pair` on why not 64-byte ones).
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
            // Signed weights + 128 are the unsigned bytes vpdpbusd wants; the bias (-128 · Σx) undoes the offset.
            let q = _mm512_xor_si512(_mm512_permutexvar_epi8(quant_idx, quants), sign_flip);
            let isum = _mm512_dpbusd_epi32(
                pair_biases(x.bias.as_ptr().add(2 * pair)),
                q,
                _mm512_loadu_si512(x.qs.as_ptr().add(pair * 2 * QK).cast()),
            );
            let scales = u16::from_le_bytes([*first, *first.add(1)]) as u32 | (second_scale as u32) << 16;
            let dw = _mm512_cvtph_ps(_mm256_set1_epi32(scales as i32));
            let scale = _mm512_mul_ps(dw, pair_scales(x.d.as_ptr().add(2 * pair)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// `vpermb` indices spreading scale bytes over dword lanes: lane `l` gets byte `first + l / 8` (the rest of the
/// dword is zeroed by the mask [`LOW_BYTE_OF_DWORD`]), matching a `vpdpbusd` result whose lanes 0..8 sum one
/// group of 32 values and lanes 8..16 the next.
pub(crate) const fn dword_spread_indices(first: usize, lanes_per_value: usize) -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut lane = 0;
    while lane < 16 {
        idx[4 * lane] = (first + lane / lanes_per_value) as u8;
        lane += 1;
    }
    idx
}

pub(crate) const LOW_BYTE_OF_DWORD: __mmask64 = 0x1111_1111_1111_1111;

/// `vpternlogd` immediate for `(a & c) | b`, written with the operands' truth-table columns.
pub(crate) const A_AND_C_OR_B: i32 = (0xF0 & 0xAA) | 0xCC;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q4_k<const PF: u8>(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
    let blocks = row_bytes / BLOCK_BYTES;
    let nibbles = low_then_high_nibbles();
    let spread: [__m512i; 4] = std::array::from_fn(|c| load_indices(&dword_spread_indices(2 * c, 8)));
    // Word w of the mins vector gets min byte w / 2 (bytes 8.. of the scales/mins vector); odd bytes are zeroed.
    let min_idx = {
        let mut idx = [0u8; 32];
        for (i, v) in idx.iter_mut().enumerate() {
            *v = (8 + i / 4) as u8;
        }
        _mm256_loadu_si256(idx.as_ptr().cast())
    };
    let end = w.as_ptr_range().end;
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm512_setzero_ps();
        let mut acc_mins = _mm256_setzero_ps();
        for (i, y) in x[..blocks].iter().enumerate() {
            let b = p.add(i * BLOCK_BYTES);
            prefetch_ahead::<3, PF>(b, end);
            let (scales, mins) = scales_mins_k4_words(&*b.add(4).cast::<[u8; 12]>());
            let scale_bytes = _mm512_castsi128_si512(_mm_set_epi64x(mins as i64, scales as i64));
            let mut isum = _mm512_setzero_si512();
            for (c, spread) in spread.iter().enumerate() {
                // 32 bytes hold 64 values: the low nibbles the first 32, the high nibbles the next 32. Repeating
                // them in both halves and taking low nibbles left, high nibbles right gives the 64 in order.
                let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(16 + 32 * c).cast()));
                let q = _mm512_gf2p8affine_epi64_epi8::<0>(packed, nibbles);
                let dot = _mm512_dpbusd_epi32(
                    _mm512_setzero_si512(),
                    q,
                    _mm512_loadu_si512(y.qs.as_ptr().add(64 * c).cast()),
                );
                // Each lane sums 4 products below 15·127, so it fits an i16: vpmaddwd with (scale, 0) multiplies.
                let group_scales = _mm512_maskz_permutexvar_epi8(LOW_BYTE_OF_DWORD, *spread, scale_bytes);
                isum = _mm512_add_epi32(isum, _mm512_madd_epi16(dot, group_scales));
            }
            let min_words = _mm256_maskz_permutexvar_epi8(0x5555_5555, min_idx, _mm512_castsi512_si256(scale_bytes));
            let imins = _mm256_madd_epi16(_mm256_loadu_si256(y.bsums.as_ptr().cast()), min_words);
            let d = half_at(b) * y.d;
            let dmin = half_at(b.add(2)) * y.d;
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d), acc);
            acc_mins = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imins), _mm256_set1_ps(dmin), acc_mins);
        }
        *o = _mm512_reduce_add_ps(acc) - reduce_add_256(acc_mins);
    }
}

/// The constants that unpack a q6_K super-block, built once per call by the one-row and the multi-row kernels.
pub(crate) struct Q6kUnpack {
    pub low_nibble: __m512i,
    pub high_nibble: __m512i,
    /// For values l (first 256 bits) and l + 32 (second): top bits 0,1 resp. 2,3 of qh[l] ...
    pub top_bits_first: __m512i,
    /// ... then 4,5 resp. 6,7.
    pub top_bits_second: __m512i,
    /// Lane l of the scale vector for values 64u.. gets group scale 4u + l / 4 in its low word.
    pub spread: [__m512i; 4],
}

impl Q6kUnpack {
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn new() -> Q6kUnpack {
        // Bit pair `low` of qh in the low 256 bits, pair `high` in the high 256 bits.
        let top_bits = |low: i8, high: i8| {
            let (l, h) = (gf2_two_bits_to_4(low), gf2_two_bits_to_4(high));
            _mm512_set_epi64(h, h, h, h, l, l, l, l)
        };
        Q6kUnpack {
            low_nibble: _mm512_set1_epi8(0x0F),
            high_nibble: _mm512_set1_epi64(GF2_HIGH_NIBBLE),
            top_bits_first: top_bits(0, 2),
            top_bits_second: top_bits(4, 6),
            spread: std::array::from_fn(|u| {
                let mut idx = [0u16; 32];
                for lane in 0..16 {
                    idx[2 * lane] = (4 * u + lane / 4) as u16;
                }
                _mm512_loadu_si512(idx.as_ptr().cast())
            }),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn rows_q6_k<const PF: u8>(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    const BLOCK_BYTES: usize = size_of::<BlockQ6K>();
    let blocks = row_bytes / BLOCK_BYTES;
    let Q6kUnpack { low_nibble, high_nibble, top_bits_first, top_bits_second, spread } = Q6kUnpack::new();
    let end = w.as_ptr_range().end;
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let p = row.as_ptr();
        let mut acc = _mm512_setzero_ps();
        for (i, y) in x[..blocks].iter().enumerate() {
            let b = p.add(i * BLOCK_BYTES);
            prefetch_ahead::<4, PF>(b, end);
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
            let scales_wide = _mm512_zextsi256_si512(scales16);
            let mut isum = _mm512_setzero_si512();
            for half in 0..2 {
                let ql = _mm512_loadu_si512(b.add(64 * half).cast());
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * half).cast()));
                // (ql & 15) | top bits, in one ternary-logic op.
                let first = _mm512_ternarylogic_epi32::<{ A_AND_C_OR_B }>(
                    ql,
                    _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_bits_first),
                    low_nibble,
                );
                let second = _mm512_or_si512(
                    _mm512_gf2p8affine_epi64_epi8::<0>(ql, high_nibble),
                    _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_bits_second),
                );
                for (t, q) in [first, second].into_iter().enumerate() {
                    let u = 2 * half + t;
                    let dot = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        q,
                        _mm512_loadu_si512(y.qs.as_ptr().add(64 * u).cast()),
                    );
                    // Lanes sum 4 products below 64·127: they fit an i16, as the scales do.
                    let group_scales = _mm512_maskz_permutexvar_epi16(0x5555_5555, spread[u], scales_wide);
                    isum = _mm512_add_epi32(isum, _mm512_madd_epi16(dot, group_scales));
                }
            }
            // The stored values are q + 32: subtract 32 · Σ scale · (group sum of x).
            let offset = _mm256_madd_epi16(scales16, _mm256_loadu_si256(y.bsums.as_ptr().cast()));
            isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(offset)));
            let d = half_at(b.add(208)) * y.d;
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d), acc);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// Dot products of float rows with `x`, four accumulators deep: `$load(ptr)` widens 16 elements starting at byte
/// pointer `ptr` to f32, `$load_masked(ptr, mask)` the first elements selected by `mask`.
macro_rules! float_rows {
    ($w:expr, $row_bytes:expr, $x:expr, $out:expr, $element_bytes:expr, $load:expr, $load_masked:expr) => {{
        let k = $row_bytes / $element_bytes;
        let xp = $x.as_ptr();
        for (row, o) in $w.chunks_exact($row_bytes).zip($out) {
            let p = row.as_ptr();
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= k {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let e = i + 16 * a;
                    *acc = _mm512_fmadd_ps($load(p.add(e * $element_bytes)), _mm512_loadu_ps(xp.add(e)), *acc);
                }
                i += 64;
            }
            while i < k {
                let mask: __mmask16 = if k - i >= 16 { !0 } else { (1u16 << (k - i)) - 1 };
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(i));
                acc[0] = _mm512_fmadd_ps($load_masked(p.add(i * $element_bytes), mask), xv, acc[0]);
                i += 16;
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            *o = _mm512_reduce_add_ps(sum);
        }
    }};
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn load_f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn load_f16x16_masked(p: *const u8, mask: __mmask16) -> __m512 {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast()))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_bf16x16(p: *const u8) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_bf16x16_masked(p: *const u8, mask: __mmask16) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p.cast()))))
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32x16(p: *const u8) -> __m512 {
    _mm512_loadu_ps(p.cast())
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32x16_masked(p: *const u8, mask: __mmask16) -> __m512 {
    _mm512_maskz_loadu_ps(mask, p.cast())
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub(crate) unsafe fn rows_f32(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 4, load_f32x16, load_f32x16_masked)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(crate) unsafe fn rows_f16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 2, load_f16x16, load_f16x16_masked)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub(crate) unsafe fn rows_bf16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    float_rows!(w, row_bytes, x, out, 2, load_bf16x16, load_bf16x16_masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_select_matrices_do_what_they_say() {
        if !crate::isa::Isa::Avx512.is_available() {
            return;
        }
        let bytes: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
        let apply = |matrix: i64| -> [u8; 64] {
            let mut out = [0u8; 64];
            // SAFETY: AVX-512 with GFNI is available (checked above).
            unsafe {
                let v = _mm512_gf2p8affine_epi64_epi8::<0>(
                    _mm512_loadu_si512(bytes.as_ptr().cast()),
                    _mm512_set1_epi64(matrix),
                );
                _mm512_storeu_si512(out.as_mut_ptr().cast(), v);
            }
            out
        };
        let low = apply(GF2_LOW_NIBBLE);
        let high = apply(GF2_HIGH_NIBBLE);
        let top = apply(gf2_two_bits_to_4(6));
        for i in 0..64 {
            assert_eq!(low[i], bytes[i] & 15);
            assert_eq!(high[i], bytes[i] >> 4);
            assert_eq!(top[i], (bytes[i] >> 6) << 4);
        }
    }
}
