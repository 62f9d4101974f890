//! The reference kernels: plain Rust, the definition of what every SIMD kernel computes.
//!
//! Each computes `out[r] = dot(row r, x)` for a run of consecutive weight rows and one activation row. Integer parts
//! are exact; the float accumulation follows ggml's scalar `ggml_vec_dot_*_generic` (one product per block, summed
//! in block order), so for q4_0 and q8_0 the result is ggml's bit for bit.

use crate::acts::{interleaved_index, Q8_0Row};
use crate::blocks::*;
use crate::dequant::{bf16_to_f32, q6k_values};
use crate::types::{QK, QK_K};

pub(crate) fn rows_q4_0(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let blocks: &[BlockQ4_0] = as_blocks(row).unwrap();
        let mut sum = 0.0f32;
        for (j, b) in blocks.iter().enumerate() {
            let mut isum = 0i32;
            for e in 0..QK / 2 {
                let (lo, hi) = ((b.qs[e] & 0xF) as i32 - 8, (b.qs[e] >> 4) as i32 - 8);
                isum += lo * x.qs[interleaved_index(j, e)] as i32 + hi * x.qs[interleaved_index(j, e + QK / 2)] as i32;
            }
            sum += isum as f32 * b.d.to_f32() * x.d[j];
        }
        *o = sum;
    }
}

pub(crate) fn rows_q8_0(w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let blocks: &[BlockQ8_0] = as_blocks(row).unwrap();
        let mut sum = 0.0f32;
        for (j, b) in blocks.iter().enumerate() {
            let isum: i32 = (0..QK).map(|e| b.qs[e] as i32 * x.qs[interleaved_index(j, e)] as i32).sum();
            sum += isum as f32 * b.d.to_f32() * x.d[j];
        }
        *o = sum;
    }
}

pub(crate) fn rows_q4_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let blocks: &[BlockQ4K] = as_blocks(row).unwrap();
        let mut sum = 0.0f32;
        for (b, y) in blocks.iter().zip(x) {
            let (scales, mins) = unpack_scales_mins_k4(&b.scales);
            let mut isum = 0i32;
            for quarter in 0..4 {
                let q = &b.qs[32 * quarter..32 * quarter + 32];
                let ys = &y.qs[64 * quarter..64 * quarter + 64];
                let lo: i32 = (0..32).map(|l| (q[l] & 0xF) as i32 * ys[l] as i32).sum();
                let hi: i32 = (0..32).map(|l| (q[l] >> 4) as i32 * ys[32 + l] as i32).sum();
                isum += scales[2 * quarter] as i32 * lo + scales[2 * quarter + 1] as i32 * hi;
            }
            let imin: i32 = (0..8).map(|g| mins[g] as i32 * (y.bsums[2 * g] as i32 + y.bsums[2 * g + 1] as i32)).sum();
            sum += b.d.to_f32() * y.d * isum as f32 - b.dmin.to_f32() * y.d * imin as f32;
        }
        *o = sum;
    }
}

pub(crate) fn rows_q6_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        let blocks: &[BlockQ6K] = as_blocks(row).unwrap();
        let mut sum = 0.0f32;
        for (b, y) in blocks.iter().zip(x) {
            let q = q6k_values(b);
            let mut isum = 0i32;
            for g in 0..QK_K / 16 {
                let group: i32 = (16 * g..16 * g + 16).map(|i| (q[i] as i32 - 32) * y.qs[i] as i32).sum();
                isum += b.scales[g] as i32 * group;
            }
            sum += b.d.to_f32() * y.d * isum as f32;
        }
        *o = sum;
    }
}

pub(crate) fn rows_f32(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        *o = row.chunks_exact(4).zip(x).map(|(b, &x)| f32::from_le_bytes(b.try_into().unwrap()) * x).sum();
    }
}

pub(crate) fn rows_f16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        *o = row.chunks_exact(2).zip(x).map(|(b, &x)| Half([b[0], b[1]]).to_f32() * x).sum();
    }
}

pub(crate) fn rows_bf16(w: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        *o = row.chunks_exact(2).zip(x).map(|(b, &x)| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * x).sum();
    }
}

/// q4_0 or q8_0 rows interleaved by 16 ([`crate::packed`]): `w` is whole groups, `out` one output per row. Each
/// row's blocks are summed in order, one fused multiply-add per block of the block's integer sum with the product of
/// the two scales: the arithmetic of the AVX-512 kernels, which give these bits exactly.
pub(crate) fn groups(ty: crate::types::GgmlType, w: &[u8], row_bytes: usize, x: Q8_0Row, out: &mut [f32]) {
    use crate::packed::{block_offsets, stored_xor, GROUP_ROWS};
    use crate::types::GgmlType;
    let blocks = row_bytes / ty.block_bytes();
    for (group, out) in w.chunks_exact(GROUP_ROWS * row_bytes).zip(out.chunks_exact_mut(GROUP_ROWS)) {
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for j in 0..blocks {
                let (quants, scales) = block_offsets(ty, blocks, j);
                let mut isum = 0i32;
                for t in 0..(ty.block_bytes() - 2) / 4 {
                    for i in 0..4 {
                        let stored = group[quants + 64 * t + 4 * r + i];
                        let e = 4 * t + i;
                        isum += match ty {
                            GgmlType::Q4_0 => {
                                let (lo, hi) = ((stored & 0xF) as i32 - 8, (stored >> 4) as i32 - 8);
                                lo * x.qs[interleaved_index(j, e)] as i32
                                    + hi * x.qs[interleaved_index(j, e + QK / 2)] as i32
                            }
                            _ => (stored ^ stored_xor(ty)) as i8 as i32 * x.qs[interleaved_index(j, e)] as i32,
                        };
                    }
                }
                let d = Half([group[scales + 2 * r], group[scales + 2 * r + 1]]);
                sum = (isum as f32).mul_add(d.to_f32() * x.d[j], sum);
            }
            *o = sum;
        }
    }
}

/// q4_K rows interleaved by 16 ([`crate::packed`]): per row and super-block, the integer sums of the sub-blocks
/// times their 6-bit scales, and of the activations' sub-block sums times the mins (both exact), then two fused
/// multiply-adds: the arithmetic of the AVX-512 kernel, which gives these bits exactly.
pub(crate) fn groups_q4_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    use crate::packed::{GROUP_ROWS, Q4_K_D, Q4_K_DMIN, Q4_K_GROUP_BYTES, Q4_K_QUANTS, Q4_K_SCALES};
    let blocks = row_bytes / size_of::<BlockQ4K>();
    for (group, out) in w.chunks_exact(GROUP_ROWS * row_bytes).zip(out.chunks_exact_mut(GROUP_ROWS)) {
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for (b, y) in x.iter().enumerate().take(blocks) {
                let sb = &group[b * Q4_K_GROUP_BYTES..(b + 1) * Q4_K_GROUP_BYTES];
                let packed: [u8; 12] = std::array::from_fn(|i| sb[Q4_K_SCALES + 64 * (i / 4) + 4 * r + i % 4]);
                let (scales, mins) = unpack_scales_mins_k4(&packed);
                let (mut sumi, mut summ) = (0i32, 0i32);
                for q in 0..4 {
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for t in 0..8 {
                        for i in 0..4 {
                            let byte = sb[Q4_K_QUANTS + 64 * (8 * q + t) + 4 * r + i];
                            lo += (byte & 0xF) as i32 * y.qs[64 * q + 4 * t + i] as i32;
                            hi += (byte >> 4) as i32 * y.qs[64 * q + 32 + 4 * t + i] as i32;
                        }
                    }
                    sumi += scales[2 * q] as i32 * lo + scales[2 * q + 1] as i32 * hi;
                }
                for (s, &m) in mins.iter().enumerate() {
                    summ += m as i32 * (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32);
                }
                let d = Half([sb[Q4_K_D + 2 * r], sb[Q4_K_D + 2 * r + 1]]).to_f32();
                let dmin = Half([sb[Q4_K_DMIN + 2 * r], sb[Q4_K_DMIN + 2 * r + 1]]).to_f32();
                sum = (sumi as f32).mul_add(d * y.d, sum);
                sum = (-(summ as f32)).mul_add(dmin * y.d, sum);
            }
            *o = sum;
        }
    }
}

/// q6_K rows interleaved by 16 ([`crate::packed`]): per row and super-block, each scale group's integer sum of
/// (stored value - 32) times activation, times the group's scale (all exact), then one fused multiply-add: the
/// arithmetic of the AVX-512 kernel, which gives these bits exactly.
pub(crate) fn groups_q6_k(w: &[u8], row_bytes: usize, x: &[BlockQ8K], out: &mut [f32]) {
    use crate::packed::{q6_k_block, GROUP_ROWS};
    let blocks = row_bytes / size_of::<BlockQ6K>();
    for (group, out) in w.chunks_exact(GROUP_ROWS * row_bytes).zip(out.chunks_exact_mut(GROUP_ROWS)) {
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for (b, y) in x.iter().enumerate().take(blocks) {
                let block = q6_k_block(group, blocks, b, r);
                let q = q6k_values(&block);
                let sumi: i32 = (0..QK_K / 16)
                    .map(|g| {
                        let dot: i32 = (16 * g..16 * g + 16).map(|i| q[i] as i32 * y.qs[i] as i32).sum();
                        block.scales[g] as i32 * (dot - 32 * y.bsums[g] as i32)
                    })
                    .sum();
                sum = (sumi as f32).mul_add(block.d.to_f32() * y.d, sum);
            }
            *o = sum;
        }
    }
}
