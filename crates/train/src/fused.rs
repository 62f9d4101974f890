//! Fused CPU pieces of the training step, each with an exact gradient.
//!
//! * [`token_logprobs`]: `log softmax(h · Wᵀ)[target]` per row — the lm_head product, the
//!   log-softmax over the vocabulary and the gather in one candle custom op whose backward is
//!   `g · (onehot − softmax)`. The vocabulary is walked in chunks of rows of `W` that stay in cache,
//!   the `[rows, vocab]` logits are never stored (the backward recomputes each chunk), rows whose
//!   incoming gradient is 0 are skipped, and the chunks run in parallel on rayon's pool. Built from
//!   candle ops the same math allocates and sweeps a `[rows, vocab]` tensor a dozen times.
//! * Vectorized loops over `f32` slices (exp, sums of squares, the AdamW update), compiled for
//!   AVX-512 / AVX2+FMA when the CPU has them and plain code otherwise. `exp` is Cephes' `expf`
//!   (relative error ~1e-7), written with plain arithmetic so that the compiler vectorizes it.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use vicuna_kernels::{sgemm_serial, MatRef};
use vicuna_model::{f32_slice, with_f32};

use crate::error::{bail, Result};

/// Rows of `h` multiplied per tile.
const ROW_BLOCK: usize = 256;
/// Parallel groups of vocabulary chunks in the backward (fixed, so results do not depend on the
/// thread count).
const GROUPS: usize = 16;
/// Floats of one logits tile (`rows × vocab chunk`): 256 KiB, well inside a core's L2.
const TILE_FLOATS: usize = 64 * 1024;

/// `log softmax(hidden · weightᵀ)` at each row's target: `hidden: [n, h]`, `weight: [vocab, h]`
/// (the lm_head, PyTorch layout), `targets`: n ids below vocab. Returns `[n]` f32 log-probabilities
/// with gradients for both tensors (as the unfused `gather_logprobs(linear(hidden, weight))`).
pub fn token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let (vocab, h2) = weight.dims2()?;
    if h != h2 || targets.len() != n {
        bail!("token_logprobs: hidden {:?}, weight {:?}, {} targets", hidden.dims(), weight.dims(), targets.len());
    }
    if hidden.dtype() != DType::F32 || weight.dtype() != DType::F32 || !hidden.device().is_cpu() {
        bail!("token_logprobs: f32 tensors on the CPU only");
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("token_logprobs: target id {bad} is outside the vocabulary of {vocab}");
    }
    let op = TokenLogprobs { targets: targets.into(), lse: OnceLock::new() };
    Ok(hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

struct TokenLogprobs {
    targets: Arc<[u32]>,
    /// Each row's log-sum-exp, from the forward pass (the backward's softmax needs it).
    lse: OnceLock<Vec<f32>>,
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (hid, w) = (f32_slice(s1, l1, "token_logprobs")?, f32_slice(s2, l2, "token_logprobs")?);
        let (n, h) = l1.shape().dims2()?;
        let vocab = l2.shape().dims2()?.0;
        let lse = log_sum_exp_rows(hid, w, n, h, vocab);
        let out = (0..n).map(|r| dot(&hid[r * h..][..h], &w[self.targets[r] as usize * h..][..h]) - lse[r]).collect();
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h) = hidden.dims2()?;
        let vocab = weight.dims2()?.0;
        let lse = self.lse.get().ok_or_else(|| candle_core::Error::Msg("token_logprobs: no forward pass".into()))?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let want_h = hidden.track_op();
        let want_w = weight.track_op();
        // Only rows with a gradient take part (masked-out targets carry 0).
        let active: Vec<usize> = (0..n).filter(|&r| g[r] != 0.0).collect();
        let na = active.len();
        let (grad_h_active, grad_w) = with_f32(hidden, |hid| {
            let mut h_act = Vec::with_capacity(na * h);
            for &r in &active {
                h_act.extend_from_slice(&hid[r * h..][..h]);
            }
            let g_act: Vec<f32> = active.iter().map(|&r| g[r]).collect();
            let t_act: Vec<u32> = active.iter().map(|&r| self.targets[r]).collect();
            let lse_act: Vec<f32> = active.iter().map(|&r| lse[r]).collect();
            with_f32(weight, |w| logits_backward(&h_act, &g_act, &t_act, &lse_act, w, h, vocab, want_h, want_w))
        })??;
        let device = hidden.device();
        let grad_h = if want_h {
            let mut full = vec![0f32; n * h];
            for (i, &r) in active.iter().enumerate() {
                full[r * h..][..h].copy_from_slice(&grad_h_active[i * h..][..h]);
            }
            Some(Tensor::from_vec(full, (n, h), device)?)
        } else {
            None
        };
        let grad_w = match grad_w {
            Some(gw) => Some(Tensor::from_vec(gw, (vocab, h), device)?),
            None => None,
        };
        Ok((grad_h, grad_w))
    }
}

/// Columns of one vocabulary chunk, so that a tile of `min(rows, ROW_BLOCK)` rows fills TILE_FLOATS.
fn vocab_chunk(rows: usize) -> usize {
    (TILE_FLOATS / rows.clamp(1, ROW_BLOCK)).clamp(128, 4096) / 16 * 16
}

/// `tile[r][j] = Σ_k a[r][k] · b[j][k]` for `a: rows × h`, `b: cols × h` (both row-major), on this thread.
fn matmul_nt(a: &[f32], rows: usize, h: usize, b: &[f32], cols: usize, tile: &mut [f32]) {
    let a = MatRef::row_major(&a[..rows * h], rows, h).expect("rows × h");
    let b = MatRef::row_major(&b[..cols * h], cols, h).expect("cols × h").t();
    sgemm_serial(a, b, &mut tile[..rows * cols], false).expect("shapes agree");
}

/// Log-sum-exp of every row of `hidden · weightᵀ`, the vocabulary in parallel chunks.
fn log_sum_exp_rows(hid: &[f32], w: &[f32], n: usize, h: usize, vocab: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let vc = vocab_chunk(n);
    let chunks = vocab.div_ceil(vc);
    // (max, Σ exp(x − max)) of each row within each chunk.
    let mut parts = vec![(f32::NEG_INFINITY, 0f32); chunks * n];
    parts.par_chunks_mut(n).enumerate().for_each_init(
        || vec![0f32; n.min(ROW_BLOCK) * vc],
        |tile, (c, part)| {
            let v0 = c * vc;
            let cols = vc.min(vocab - v0);
            for r0 in (0..n).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(n - r0);
                matmul_nt(&hid[r0 * h..], rows, h, &w[v0 * h..], cols, tile);
                for r in 0..rows {
                    part[r0 + r] = max_sum_exp(&tile[r * cols..][..cols]);
                }
            }
        },
    );
    (0..n)
        .map(|r| {
            let m = (0..chunks).map(|c| parts[c * n + r].0).fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = (0..chunks).map(|c| parts[c * n + r].1 as f64 * ((parts[c * n + r].0 - m) as f64).exp()).sum();
            m + s.ln() as f32
        })
        .collect()
}

/// Gradients of `Σ_r g_r · logp_r` for the active rows: `(dL/dh [na × h], dL/dW [vocab × h])`,
/// each only when wanted (zeros / None otherwise).
///
/// The vocabulary chunks are split into a fixed number of groups that run in parallel; a group
/// owns its rows of dL/dW and adds into its own dL/dh, and the groups' dL/dh are summed in group
/// order. The sums never depend on the number of threads or on scheduling: runs repeat exactly.
#[allow(clippy::too_many_arguments)]
fn logits_backward(
    h_act: &[f32],
    g_act: &[f32],
    t_act: &[u32],
    lse_act: &[f32],
    w: &[f32],
    h: usize,
    vocab: usize,
    want_h: bool,
    want_w: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let na = g_act.len();
    let mut grad_w = want_w.then(|| vec![0f32; vocab * h]);
    let mut grad_h = vec![0f32; na * h];
    if na == 0 || !(want_h || want_w) {
        return (grad_h, grad_w);
    }
    let vc = vocab_chunk(na);
    let chunks = vocab.div_ceil(vc);
    let per_group = chunks.div_ceil(GROUPS.min(chunks));
    for r0 in (0..na).step_by(ROW_BLOCK) {
        let rows = ROW_BLOCK.min(na - r0);
        let hb = &h_act[r0 * h..][..rows * h];
        // One group: chunks [first, first + per_group) of the vocabulary, for this row block.
        let group = |tile: &mut Vec<f32>, gi: usize, mut gw: Option<&mut [f32]>| -> Vec<f32> {
            let mut acc = vec![0f32; if want_h { rows * h } else { 0 }];
            for c in gi * per_group..((gi + 1) * per_group).min(chunks) {
                let v0 = c * vc;
                let cols = vc.min(vocab - v0);
                let wc = &w[v0 * h..][..cols * h];
                matmul_nt(hb, rows, h, wc, cols, tile);
                // d logp_r / d logit_rj = onehot − softmax, times g_r.
                for r in 0..rows {
                    let gr = g_act[r0 + r];
                    let row = &mut tile[r * cols..][..cols];
                    exp_shift_scale(row, lse_act[r0 + r], -gr);
                    let t = t_act[r0 + r] as usize;
                    if (v0..v0 + cols).contains(&t) {
                        row[t - v0] += gr;
                    }
                }
                let d = MatRef::row_major(&tile[..rows * cols], rows, cols).expect("rows × cols");
                if let Some(gw) = gw.as_deref_mut() {
                    // dW[j][k] (+)= Σ_r D[r][j] · h[r][k]
                    let gwc = &mut gw[(c - gi * per_group) * vc * h..][..cols * h];
                    let hb = MatRef::row_major(hb, rows, h).expect("rows × h");
                    sgemm_serial(d.t(), hb, gwc, r0 > 0).expect("shapes agree");
                }
                if want_h {
                    // dh[r][k] += Σ_j D[r][j] · W[j][k]
                    let wc = MatRef::row_major(wc, cols, h).expect("cols × h");
                    sgemm_serial(d, wc, &mut acc, true).expect("shapes agree");
                }
            }
            acc
        };
        let tile = || vec![0f32; rows * vc];
        let partials: Vec<Vec<f32>> = match grad_w.as_deref_mut() {
            Some(gw) => gw
                .par_chunks_mut(per_group * vc * h)
                .enumerate()
                .map_init(tile, |t, (gi, gw)| group(t, gi, Some(gw)))
                .collect(),
            None => {
                (0..chunks.div_ceil(per_group)).into_par_iter().map_init(tile, |t, gi| group(t, gi, None)).collect()
            }
        };
        if want_h {
            let dst = &mut grad_h[r0 * h..][..rows * h];
            for p in &partials {
                dst.iter_mut().zip(p).for_each(|(d, x)| *d += x);
            }
        }
    }
    (grad_h, grad_w)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// Vectorized loops.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2²³ rounds to the nearest integer (for |x| < 2²²), and the low
/// bits of the sum are that integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Cephes `expf`: `x = n ln2 + r`, `exp(r)` by a degree-6 polynomial, times `2ⁿ` built in the
/// exponent bits. Arguments are clamped to [−87.3, 88.3] (below, the result ~1e-38 counts as 0).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()).wrapping_add(127) << 23);
    e * scale
}

const LANES: usize = 16;

#[inline(always)]
fn max_sum_exp_generic(row: &[f32]) -> (f32, f32) {
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut mx = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for i in 0..LANES {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    let m = mx.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut s = [0f32; LANES];
    for c in row.chunks_exact(LANES) {
        for i in 0..LANES {
            s[i] += exp_f32(c[i] - m);
        }
    }
    (m, s.iter().sum::<f32>() + rest.iter().map(|&x| exp_f32(x - m)).sum::<f32>())
}

#[inline(always)]
fn exp_shift_scale_generic(row: &mut [f32], shift: f32, scale: f32) {
    row.iter_mut().for_each(|x| *x = scale * exp_f32(*x - shift));
}

#[inline(always)]
fn sum_sq_generic(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut s = [0f32; LANES];
    for c in chunks {
        for i in 0..LANES {
            s[i] += c[i] * c[i];
        }
    }
    s.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>()
}

/// The constants of one AdamW step (PyTorch's formulation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `lr / (1 − β₁ᵗ)`
    pub step_size: f32,
    /// `1 / sqrt(1 − β₂ᵗ)`
    pub inv_sqrt_bias2: f32,
    pub eps: f32,
    /// `1 − lr · weight_decay`
    pub decay: f32,
    /// Factor on the gradient (clipping).
    pub grad_scale: f32,
}

#[inline(always)]
fn adamw_generic(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamWStep) {
    let (c1, c2) = (1.0 - k.beta1, 1.0 - k.beta2);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * k.grad_scale;
        *m = k.beta1 * *m + c1 * g;
        *v = k.beta2 * *v + c2 * (g * g);
        let denom = v.sqrt() * k.inv_sqrt_bias2 + k.eps;
        *p = *p * k.decay - k.step_size * (*m / denom);
    }
}

/// One function per instruction set: the generic body compiled with AVX-512, with AVX2+FMA, or
/// plain, picked at run time.
macro_rules! multiversion {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

multiversion!(max_sum_exp, max_sum_exp_generic, (row: &[f32]) -> (f32, f32));
multiversion!(exp_shift_scale, exp_shift_scale_generic, (row: &mut [f32], shift: f32, scale: f32) -> ());
multiversion!(sum_sq_f32, sum_sq_generic, (x: &[f32]) -> f32);
multiversion!(adamw_chunk, adamw_generic, (p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamWStep) -> ());

/// Elements per parallel task of the elementwise loops.
pub(crate) const PAR_CHUNK: usize = 16 * 1024;

/// `Σ x²` in f64 (f32 lanes within chunks of PAR_CHUNK, in parallel; the chunks summed in f64 in
/// order, so the result does not depend on scheduling).
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(PAR_CHUNK).map(|c| sum_sq_f32(c) as f64).collect();
    parts.iter().sum()
}

/// Squared L2 norm of each gradient, read in place.
pub(crate) fn grads_sum_sq(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads {
        let g = if g.dtype() == DType::F32 { g.contiguous()? } else { g.to_dtype(DType::F32)?.contiguous()? };
        total += with_f32(&g, sum_sq)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_f32(-1000.0) < 1e-37);
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.3 - 5.0).collect();
        let (m, s) = max_sum_exp(&row);
        let want: f32 = row.iter().map(|x| (x - m).exp()).sum();
        assert_eq!(m, 36.0 * 0.3 - 5.0);
        assert!((s - want).abs() / want < 1e-6);
        let copy = row.clone();
        exp_shift_scale(&mut row, 1.5, -2.0);
        for (a, x) in row.iter().zip(copy) {
            let want = -2.0 * (x - 1.5).exp();
            assert!((a - want).abs() <= 1e-6 * want.abs());
        }
    }

    /// The unfused reference: candle ops on the full logits.
    fn reference(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Tensor {
        let logits = hidden.matmul(&weight.t().unwrap()).unwrap();
        let max = logits.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
        let idx = Tensor::new(targets, hidden.device()).unwrap().unsqueeze(1).unwrap();
        shifted.gather(&idx, 1).unwrap().sub(&lse).unwrap().squeeze(1).unwrap()
    }

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = vicuna_engine::Rng::new(seed);
        (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale, "{what}: worst difference {worst} (scale {scale})");
    }

    #[test]
    fn token_logprobs_matches_the_unfused_ops_and_their_gradients() {
        let dev = Device::Cpu;
        // Several vocabulary chunks with a ragged last one, more rows than one row block.
        for &(n, h, vocab) in &[(3usize, 8usize, 50usize), (300, 16, 1000), (40, 32, 9001)] {
            let hidden = Var::from_vec(random(n * h, 1, 1.0), (n, h), &dev).unwrap();
            let weight = Var::from_vec(random(vocab * h, 2, 0.5), (vocab, h), &dev).unwrap();
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab) as u32).collect();
            // Some rows carry no gradient (masked), the others different weights.
            let coef: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 + i as f32 * 0.01 }).collect();
            let coef = Tensor::new(coef.as_slice(), &dev).unwrap();

            let fused = token_logprobs(hidden.as_tensor(), weight.as_tensor(), &targets).unwrap();
            let unfused = reference(hidden.as_tensor(), weight.as_tensor(), &targets);
            assert_close(&fused, &unfused, 1e-5, "log-probabilities");

            let gf = fused.mul(&coef).unwrap().sum_all().unwrap().backward().unwrap();
            let gu = unfused.mul(&coef).unwrap().sum_all().unwrap().backward().unwrap();
            for (t, what) in [(hidden.as_tensor(), "d/dhidden"), (weight.as_tensor(), "d/dweight")] {
                assert_close(gf.get(t).unwrap(), gu.get(t).unwrap(), 1e-5, what);
            }
        }
    }

    #[test]
    fn token_logprobs_without_weight_gradient() {
        let dev = Device::Cpu;
        let (n, h, vocab) = (5, 8, 300);
        let hidden = Var::from_vec(random(n * h, 3, 1.0), (n, h), &dev).unwrap();
        let weight = Tensor::from_vec(random(vocab * h, 4, 0.5), (vocab, h), &dev).unwrap();
        let targets = [0u32, 299, 17, 17, 150];
        let gf = token_logprobs(hidden.as_tensor(), &weight, &targets).unwrap().sum_all().unwrap().backward().unwrap();
        let gu = reference(hidden.as_tensor(), &weight, &targets).sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(hidden.as_tensor()).unwrap(), gu.get(hidden.as_tensor()).unwrap(), 1e-5, "d/dhidden");
        assert!(gf.get(&weight).is_none());
    }
}
