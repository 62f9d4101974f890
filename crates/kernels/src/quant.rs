//! f32 → blocks: ggml's *reference* quantizers (`quantize_row_*_ref` in `ggml-quants.c`), which are what
//! `llama-quantize` runs when no importance matrix is given.
//!
//! Every arithmetic expression is evaluated in ggml's order, in f32, without fused multiply-add, so the blocks match
//! ggml's byte for byte (checked against vectors made with libggml, see `tests/data/make_reference.py`). Loops index
//! the way ggml's do, to keep the two easy to compare line by line.
#![allow(clippy::needless_range_loop)]

use crate::blocks::*;
use crate::types::{check_len, GgmlType, Result, QK, QK_K};

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is stored as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Encodes one row of f32 values (`src.len()` elements, a whole number of blocks) as `ty` into `dst`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len("quantized row", crate::types::row_size(ty, src.len())?, dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (bytes, v) in dst.chunks_exact_mut(4).zip(src) {
                bytes.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (bytes, &v) in dst.chunks_exact_mut(2).zip(src) {
                bytes.copy_from_slice(&Half::from_f32(v).0);
            }
        }
        GgmlType::BF16 => {
            for (bytes, &v) in dst.chunks_exact_mut(2).zip(src) {
                bytes.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => quantize_q4_0(src, as_blocks_mut(dst)?),
        GgmlType::Q4_1 => quantize_q4_1(src, as_blocks_mut(dst)?),
        GgmlType::Q5_0 => quantize_q5_0(src, as_blocks_mut(dst)?),
        GgmlType::Q5_1 => quantize_q5_1(src, as_blocks_mut(dst)?),
        GgmlType::Q8_0 => quantize_q8_0(src, as_blocks_mut(dst)?),
        GgmlType::Q2_K => quantize_q2_k(src, as_blocks_mut(dst)?),
        GgmlType::Q3_K => quantize_q3_k(src, as_blocks_mut(dst)?),
        GgmlType::Q4_K => quantize_q4_k(src, as_blocks_mut(dst)?),
        GgmlType::Q5_K => quantize_q5_k(src, as_blocks_mut(dst)?),
        GgmlType::Q6_K => quantize_q6_k(src, as_blocks_mut(dst)?),
        GgmlType::Q8_K => {
            // q8_K blocks hold an f32 and i16s: quantize into aligned blocks, then copy the bytes out.
            let mut blocks = vec![BlockQ8K { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] }; src.len() / QK_K];
            quantize_q8_k(src, &mut blocks);
            for (bytes, b) in dst.chunks_exact_mut(GgmlType::Q8_K.block_bytes()).zip(&blocks) {
                bytes[..4].copy_from_slice(&b.d.to_le_bytes());
                for (o, &q) in bytes[4..4 + QK_K].iter_mut().zip(&b.qs) {
                    *o = q as u8;
                }
                for (o, s) in bytes[4 + QK_K..].chunks_exact_mut(2).zip(&b.bsums) {
                    o.copy_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    Ok(())
}

/// f32 → bfloat16 bits, ties to even, NaNs kept quiet (ggml's `ggml_compute_fp32_to_bf16`).
pub fn f32_to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7fff + ((u >> 16) & 1)) as u64) >> 16) as u16
}

/// Round to nearest, ties to even, for |v| <= 4194303 (ggml's `nearest_int`: the magic-number addition trick).
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The value of largest magnitude (the first one, if several tie) and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

pub(crate) fn quantize_q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = Half::from_f32(d);
        for (q, &v) in y.qs.iter_mut().zip(x) {
            // `roundf`: halves away from zero, which is what Rust's `round` does.
            *q = (v * id).round() as i8;
        }
    }
}

pub(crate) fn quantize_q4_0(src: &[f32], dst: &mut [BlockQ4_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst) {
        let (max, _) = signed_absmax(x);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = Half::from_f32(d);
        for j in 0..QK / 2 {
            // `(int8_t)(v + 8.5f)` truncates toward zero; the argument is never negative.
            let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Minimum and maximum as ggml's q4_1 / q5_1 find them (starting from ±FLT_MAX).
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

pub(crate) fn quantize_q4_1(src: &[f32], dst: &mut [BlockQ4_1]) {
    for (x, y) in src.chunks_exact(QK).zip(dst) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = Half::from_f32(d);
        y.m = Half::from_f32(min);
        for j in 0..QK / 2 {
            let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Packs 32 five-bit values into q5_0 / q5_1 nibbles and high bits.
fn pack_q5(q: &[u8; QK]) -> ([u8; QK / 2], [u8; 4]) {
    let mut qs = [0u8; QK / 2];
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        qs[j] = (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4);
        qh |= (((q[j] & 0x10) >> 4) as u32) << j;
        qh |= (((q[j + QK / 2] & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    (qs, qh.to_le_bytes())
}

pub(crate) fn quantize_q5_0(src: &[f32], dst: &mut [BlockQ5_0]) {
    for (x, y) in src.chunks_exact(QK).zip(dst) {
        let (max, _) = signed_absmax(x);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = Half::from_f32(d);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            *q = ((v * id + 16.5) as i8).min(31) as u8;
        }
        (y.qs, y.qh) = pack_q5(&q);
    }
}

pub(crate) fn quantize_q5_1(src: &[f32], dst: &mut [BlockQ5_1]) {
    for (x, y) in src.chunks_exact(QK).zip(dst) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = Half::from_f32(d);
        y.m = Half::from_f32(min);
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            // ggml converts straight to uint8_t here, without the clamp the other formats have.
            *q = ((v - min) * id + 0.5) as u8;
        }
        (y.qs, y.qh) = pack_q5(&q);
    }
}

/// Activations for the k-quant dot products (ggml's `quantize_row_q8_K_ref`): one scale per 256 values chosen so
/// the value of largest magnitude maps to -127, plus the sums of each group of 16 quants.
pub(crate) fn quantize_q8_k(src: &[f32], dst: &mut [BlockQ8K]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let (max, amax) = signed_absmax(x);
        if amax == 0.0 {
            y.d = 0.0;
            y.qs = [0; QK_K];
            y.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (sum, group) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *sum = group.iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}

/// ggml's `make_qx_quants` with `rmse_type == 1` and no importance weights: symmetric quantization of `x` to
/// `-nmax..nmax` (stored in `levels` offset by `nmax`), searching 19 scales around `nmax / max` for the one that
/// minimizes the x²-weighted squared error. Returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let weighted_sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = clamp(nearest_int(iscale * v)) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let set_levels = |levels: &mut [i8], iscale: f32| {
        for (level, &v) in levels.iter_mut().zip(x) {
            *level = (nmax + clamp(nearest_int(iscale * v))) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    set_levels(levels, iscale);
    let (sumlx, suml2) = weighted_sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = weighted_sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            set_levels(levels, iscale);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse`: like [`make_qx_quants`] but refined by moving single levels (up to five
/// passes) while that lowers the x²-weighted error. Levels are stored offset by `nmax`. Returns the scale.
fn make_q3_quants(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (level, &v) in levels.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *level = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (level, &v) in levels.iter_mut().zip(x) {
            let w = v * v;
            let old = *level as f32;
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *level as i32 {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *level = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for level in levels.iter_mut() {
        *level += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Search parameters of ggml's `make_qkx2_quants`: the candidate inverse scales are
/// `(rmin + rdelta * is + nmax) / (max - min)` for `is` in `0..=nstep`; `use_mad` picks absolute over squared error.
struct Qkx2Search {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// ggml's `make_qkx2_quants`: asymmetric quantization `x ≈ scale * l - min` with `l` in `0..=nmax`, choosing scale
/// and min by weighted least squares over the candidate scales of `search`. Returns `(scale, min)`.
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], search: &Qkx2Search) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let error = |diff: f32| if search.use_mad { diff.abs() } else { diff * diff };
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        best_error += weights[i] * error(scale * l as f32 + min - x[i]);
    }
    if search.nstep < 1 {
        return (scale, -min);
    }
    let mut candidate = [0u8; QK_K];
    let candidate = &mut candidate[..n];
    for is in 0..=search.nstep {
        let iscale = (search.rmin + search.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            candidate[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                cur_error += weights[i] * error(this_scale * candidate[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                levels.copy_from_slice(candidate);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 2-bit levels the way q2_K and q3_K store them: per 128-element half, byte `l` of its 32 bytes holds
/// elements `l`, `l + 32`, `l + 64`, `l + 96` from the low bits up.
fn pack_2bit(levels: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for half in 0..2 {
        let l = &levels[128 * half..128 * half + 128];
        for i in 0..32 {
            qs[32 * half + i] = l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6);
        }
    }
    qs
}

pub(crate) fn quantize_q2_k(src: &[f32], dst: &mut [BlockQ2K]) {
    const Q4SCALE: f32 = 15.0;
    let search = Qkx2Search { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let mut levels = [0u8; QK_K];
        let (mut scales, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..16 {
            let xg = &x[16 * j..16 * j + 16];
            let weights: [f32; 16] = std::array::from_fn(|l| xg[l].abs());
            (scales[j], mins[j]) = make_qkx2_quants(3, xg, &weights, &mut levels[16 * j..16 * j + 16], &search);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for j in 0..16 {
                y.scales[j] = nearest_int(iscale * scales[j]) as u8;
            }
            y.d = Half::from_f32(max_scale / Q4SCALE);
        } else {
            y.scales = [0; 16];
            y.d = Half::from_f32(0.0);
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for j in 0..16 {
                y.scales[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            y.dmin = Half::from_f32(max_min / Q4SCALE);
        } else {
            y.dmin = Half::from_f32(0.0);
        }
        for j in 0..16 {
            let d = y.d.to_f32() * (y.scales[j] & 0xF) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = y.dmin.to_f32() * (y.scales[j] >> 4) as f32;
            for i in 16 * j..16 * j + 16 {
                levels[i] = nearest_int((x[i] + dm) / d).clamp(0, 3) as u8;
            }
        }
        y.qs = pack_2bit(&levels);
    }
}

pub(crate) fn quantize_q3_k(src: &[f32], dst: &mut [BlockQ3K]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let mut levels = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut levels[16 * j..16 * j + 16]);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }
        y.scales = [0; 12];
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &scale) in scales.iter().enumerate() {
                // ggml stores nearest_int into an int8_t before clamping: keep that wrap-around.
                let l = ((nearest_int(iscale * scale) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    y.scales[j] = l & 0xF;
                } else {
                    y.scales[j - 8] |= (l & 0xF) << 4;
                }
                y.scales[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            y.d = Half::from_f32(1.0 / iscale);
        } else {
            y.d = Half::from_f32(0.0);
        }
        let group_scales = unpack_scales_q3k(&y.scales);
        for j in 0..16 {
            let d = y.d.to_f32() * group_scales[j] as f32;
            if d == 0.0 {
                continue;
            }
            for i in 16 * j..16 * j + 16 {
                levels[i] = (nearest_int(x[i] / d).clamp(-4, 3) + 4) as i8;
            }
        }
        y.hmask = [0; QK_K / 8];
        let mut low = [0u8; QK_K];
        for (i, &level) in levels.iter().enumerate() {
            let mut level = level as u8;
            if level > 3 {
                y.hmask[i % 32] |= 1 << (i / 32);
                level -= 4;
            }
            low[i] = level;
        }
        y.qs = pack_2bit(&low);
    }
}

/// The shared body of q4_K and q5_K (`nmax` 15 or 31): per group of 32, an asymmetric fit with weights
/// `rms + |x|`; then the 8 scales and 8 mins are themselves quantized to 6 bits against the block's `d` and `dmin`,
/// and every element is requantized against the stored (rounded) scales. Returns the packed scales, `d`, `dmin` and
/// the levels.
fn quantize_k4_scales(x: &[f32], nmax: i32, search: &Qkx2Search) -> ([u8; 12], Half, Half, [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xg = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xg {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xg[l].abs());
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xg, &weights, &mut levels[32 * j..32 * j + 32], search);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // ggml converts nearest_int to uint8_t before clamping to 63: keep that wrap-around.
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let packed = pack_scales_mins_k4(&ls, &lm);
    let d = Half::from_f32(max_scale / 63.0);
    let dmin = Half::from_f32(max_min / 63.0);
    let (sc, m) = unpack_scales_mins_k4(&packed);
    for j in 0..8 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m[j] as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (packed, d, dmin, levels)
}

pub(crate) fn quantize_q4_k(src: &[f32], dst: &mut [BlockQ4K]) {
    let search = Qkx2Search { rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let (scales, d, dmin, levels) = quantize_k4_scales(x, 15, &search);
        (y.scales, y.d, y.dmin) = (scales, d, dmin);
        for quarter in 0..4 {
            for l in 0..32 {
                y.qs[32 * quarter + l] = levels[64 * quarter + l] | (levels[64 * quarter + 32 + l] << 4);
            }
        }
    }
}

pub(crate) fn quantize_q5_k(src: &[f32], dst: &mut [BlockQ5K]) {
    let search = Qkx2Search { rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false };
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let (scales, d, dmin, levels) = quantize_k4_scales(x, 31, &search);
        (y.scales, y.d, y.dmin) = (scales, d, dmin);
        y.qh = [0; QK_K / 8];
        for quarter in 0..4 {
            for l in 0..32 {
                let (mut l1, mut l2) = (levels[64 * quarter + l], levels[64 * quarter + 32 + l]);
                if l1 > 15 {
                    l1 -= 16;
                    y.qh[l] |= 1 << (2 * quarter);
                }
                if l2 > 15 {
                    l2 -= 16;
                    y.qh[l] |= 2 << (2 * quarter);
                }
                y.qs[32 * quarter + l] = l1 | (l2 << 4);
            }
        }
    }
}

pub(crate) fn quantize_q6_k(src: &[f32], dst: &mut [BlockQ6K]) {
    for (x, y) in src.chunks_exact(QK_K).zip(dst) {
        let mut levels = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for g in 0..16 {
            scales[g] = make_qx_quants(32, &x[16 * g..16 * g + 16], &mut levels[16 * g..16 * g + 16]);
            if scales[g].abs() > max_abs_scale {
                max_abs_scale = scales[g].abs();
                max_scale = scales[g];
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            *y = BlockQ6K { ql: [0; QK_K / 2], qh: [0; QK_K / 4], scales: [0; QK_K / 16], d: Half::from_f32(0.0) };
            continue;
        }
        let iscale = -128.0 / max_scale;
        y.d = Half::from_f32(1.0 / iscale);
        for g in 0..16 {
            y.scales[g] = nearest_int(iscale * scales[g]).min(127) as i8;
        }
        for g in 0..16 {
            let d = y.d.to_f32() * y.scales[g] as f32;
            if d == 0.0 {
                continue;
            }
            for i in 16 * g..16 * g + 16 {
                levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as i8;
            }
        }
        crate::dequant::q6k_pack_values(&levels.map(|l| l as u8), y);
    }
}
