//! Blocks → f32, for every format: the generic slow path, and the definition the fast kernels are tested against.
//!
//! Each function evaluates exactly the expressions of ggml's `dequantize_row_*` in the same order (no fused
//! multiply-add), so the output equals ggml's bit for bit (checked against vectors made with libggml).

use crate::blocks::*;
use crate::types::{check_len, GgmlType, Result, QK, QK_K};

/// Decodes one row of `ty` elements stored in `src` into `dst` (`dst.len()` elements, a whole number of blocks).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_len("quantized row", crate::types::row_size(ty, dst.len())?, src.len())?;
    match ty {
        GgmlType::F32 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *out = f32::from_le_bytes(bytes.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = Half([bytes[0], bytes[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = bf16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]]));
            }
        }
        GgmlType::Q4_0 => dequantize_q4_0(as_blocks(src)?, dst),
        GgmlType::Q4_1 => dequantize_q4_1(as_blocks(src)?, dst),
        GgmlType::Q5_0 => dequantize_q5_0(as_blocks(src)?, dst),
        GgmlType::Q5_1 => dequantize_q5_1(as_blocks(src)?, dst),
        GgmlType::Q8_0 => dequantize_q8_0(as_blocks(src)?, dst),
        GgmlType::Q2_K => dequantize_q2_k(as_blocks(src)?, dst),
        GgmlType::Q3_K => dequantize_q3_k(as_blocks(src)?, dst),
        GgmlType::Q4_K => dequantize_q4_k(as_blocks(src)?, dst),
        GgmlType::Q5_K => dequantize_q5_k(as_blocks(src)?, dst),
        GgmlType::Q6_K => dequantize_q6_k(as_blocks(src)?, dst),
        GgmlType::Q8_K => {
            // q8_K blocks hold an f32, so a byte buffer may not be aligned for them: decode from bytes.
            for (bytes, out) in src.chunks_exact(GgmlType::Q8_K.block_bytes()).zip(dst.chunks_exact_mut(QK_K)) {
                let d = f32::from_le_bytes(bytes[..4].try_into().unwrap());
                for (o, &q) in out.iter_mut().zip(&bytes[4..4 + QK_K]) {
                    *o = d * q as i8 as f32;
                }
            }
        }
    }
    Ok(())
}

/// bfloat16 bits → f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

pub(crate) fn dequantize_q4_0(blocks: &[BlockQ4_0], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            out[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
            out[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q4_1(blocks: &[BlockQ4_1], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..QK / 2 {
            out[j] = (b.qs[j] & 0xF) as f32 * d + m;
            out[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// The 5-bit values of a q5_0 / q5_1 block, element order.
fn q5_values(qs: &[u8; QK / 2], qh: [u8; 4]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
    }
    q
}

pub(crate) fn dequantize_q5_0(blocks: &[BlockQ5_0], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, q) in out.iter_mut().zip(q5_values(&b.qs, b.qh)) {
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q5_1(blocks: &[BlockQ5_1], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for (o, q) in out.iter_mut().zip(q5_values(&b.qs, b.qh)) {
            *o = q as f32 * d + m;
        }
    }
}

pub(crate) fn dequantize_q8_0(blocks: &[BlockQ8_0], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q2_k(blocks: &[BlockQ2K], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
        for half in 0..2 {
            let q = &b.qs[32 * half..32 * half + 32];
            for shift_index in 0..4 {
                let shift = 2 * shift_index;
                for sub in 0..2 {
                    let group = 8 * half + 2 * shift_index + sub;
                    let sc = b.scales[group];
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for l in 0..16 {
                        out[16 * group + l] = dl * ((q[16 * sub + l] >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

pub(crate) fn dequantize_q3_k(blocks: &[BlockQ3K], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d_all = b.d.to_f32();
        let scales = unpack_scales_q3k(&b.scales);
        for half in 0..2 {
            let q = &b.qs[32 * half..32 * half + 32];
            for shift_index in 0..4 {
                let shift = 2 * shift_index;
                let mask = 1u8 << (4 * half + shift_index);
                for sub in 0..2 {
                    let group = 8 * half + 2 * shift_index + sub;
                    let dl = d_all * scales[group] as f32;
                    for l in 0..16 {
                        let low = ((q[16 * sub + l] >> shift) & 3) as i32;
                        let high_missing = if b.hmask[16 * sub + l] & mask != 0 { 0 } else { 4 };
                        out[16 * group + l] = dl * (low - high_missing) as f32;
                    }
                }
            }
        }
    }
}

pub(crate) fn dequantize_q4_k(blocks: &[BlockQ4K], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
        let (scales, mins) = unpack_scales_mins_k4(&b.scales);
        for quarter in 0..4 {
            let q = &b.qs[32 * quarter..32 * quarter + 32];
            let (g0, g1) = (2 * quarter, 2 * quarter + 1);
            let (d1, m1) = (d * scales[g0] as f32, min * mins[g0] as f32);
            let (d2, m2) = (d * scales[g1] as f32, min * mins[g1] as f32);
            for l in 0..32 {
                out[64 * quarter + l] = d1 * (q[l] & 0xF) as f32 - m1;
                out[64 * quarter + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

pub(crate) fn dequantize_q5_k(blocks: &[BlockQ5K], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
        let (scales, mins) = unpack_scales_mins_k4(&b.scales);
        for quarter in 0..4 {
            let q = &b.qs[32 * quarter..32 * quarter + 32];
            let (g0, g1) = (2 * quarter, 2 * quarter + 1);
            let (d1, m1) = (d * scales[g0] as f32, min * mins[g0] as f32);
            let (d2, m2) = (d * scales[g1] as f32, min * mins[g1] as f32);
            let (u1, u2) = (1u8 << (2 * quarter), 2u8 << (2 * quarter));
            for l in 0..32 {
                let high1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let high2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                out[64 * quarter + l] = d1 * ((q[l] & 0xF) + high1) as f32 - m1;
                out[64 * quarter + 32 + l] = d2 * ((q[l] >> 4) + high2) as f32 - m2;
            }
        }
    }
}

/// The 6-bit values (0..64) of a q6_K block, element order.
pub(crate) fn q6k_values(b: &BlockQ6K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for half in 0..2 {
        let ql = &b.ql[64 * half..64 * half + 64];
        let qh = &b.qh[32 * half..32 * half + 32];
        let out = &mut q[128 * half..128 * half + 128];
        for l in 0..32 {
            out[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            out[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// The inverse of [`q6k_values`]: `values` (six bits each) written into `b`'s `ql` and `qh`.
pub(crate) fn q6k_pack_values(values: &[u8; QK_K], b: &mut BlockQ6K) {
    for half in 0..2 {
        let v = &values[128 * half..128 * half + 128];
        let (ql, qh) = (&mut b.ql[64 * half..64 * half + 64], &mut b.qh[32 * half..32 * half + 32]);
        for l in 0..32 {
            ql[l] = (v[l] & 0xF) | (v[l + 64] & 0xF) << 4;
            ql[l + 32] = (v[l + 32] & 0xF) | (v[l + 96] & 0xF) << 4;
            qh[l] = v[l] >> 4 | (v[l + 32] >> 4) << 2 | (v[l + 64] >> 4) << 4 | (v[l + 96] >> 4) << 6;
        }
    }
}

pub(crate) fn dequantize_q6_k(blocks: &[BlockQ6K], dst: &mut [f32]) {
    for (b, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let q = q6k_values(b);
        for (i, o) in out.iter_mut().enumerate() {
            *o = d * b.scales[i / 16] as f32 * (q[i] as i32 - 32) as f32;
        }
    }
}
