//! The training pass's layers as single candle ops with hand-written gradients: RMSNorm, rotary position embedding,
//! SwiGLU's gate and causal self-attention. Built from candle's elementwise ops, each of these is five to ten graph
//! nodes, every one with its own temporaries in the forward pass and its own gradient buffers in the backward; here
//! each is one node whose backward is the closed form.
//!
//! [`f32_slice`] and [`with_f32`] read a contiguous f32 CPU tensor in place, for these ops and the train crate's.
//!
//! The arithmetic is transformers' (`LlamaRMSNorm`, `silu(gate) * up`, eager attention with a causal mask), in f32.
//! Work is split over rayon's current pool in fixed pieces, so results do not depend on the number of threads.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use vicuna_kernels::{sgemm_serial, MatRef};

use crate::Result;

/// Rows of one piece of the row-wise ops.
const ROWS: usize = 32;

/// The f32 data of a custom op's contiguous CPU operand; errors name `op`.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{op}: f32 tensors only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: contiguous tensors only"),
    }
}

/// A tensor's f32 data borrowed in place (the backward passes read their inputs without copying them).
struct Data<'a, G> {
    storage: G,
    layout: &'a Layout,
}

/// `t`'s data; `t` must be contiguous (the ops' inputs are; a gradient may need `.contiguous()` first).
fn data(t: &Tensor) -> Data<'_, impl std::ops::Deref<Target = candle_core::Storage> + '_> {
    let (storage, layout) = t.storage_and_layout();
    Data { storage, layout }
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> Data<'_, G> {
    fn slice(&self) -> candle_core::Result<&[f32]> {
        match &*self.storage {
            candle_core::Storage::Cpu(s) => f32_slice(s, self.layout, "fused op"),
            _ => candle_core::bail!("fused ops run on the CPU only"),
        }
    }
}

/// Run `f` on a contiguous f32 CPU tensor's data, in place (no copy).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    Ok(f(data(t).slice()?))
}

fn is_cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// RMSNorm: `weight · x / sqrt(mean(x²) + eps)` over the last dimension, as transformers' `LlamaRMSNorm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !is_cpu_f32(&[x, weight]) {
        let mean_sq = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
        return Ok(normed.broadcast_mul(weight)?);
    }
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })?)
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    /// `1 / sqrt(mean(x²) + eps)` of one row.
    fn inverse_rms(&self, row: &[f32]) -> f32 {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (mean + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "vicuna-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "rms_norm")?, f32_slice(s2, l2, "rms_norm")?);
        let h = w.len();
        if h == 0 || l1.dims().last() != Some(&h) {
            candle_core::bail!("rms_norm: weight of {h} for input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * h).zip(x.par_chunks(ROWS * h)).for_each(|(out, x)| {
            for (o, x) in out.chunks_mut(h).zip(x.chunks(h)) {
                let r = self.inverse_rms(x);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = w * (x * r);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (xd, wd, gd) = (data(x), data(w), data(&g));
        let (xs, ws, gs) = (xd.slice()?, wd.slice()?, gd.slice()?);
        let h = ws.len();
        // With x̂ = x·r and u = g·w: ∂x = r·(u − x̂·mean(u·x̂)), ∂w = Σ_rows g·x̂.
        let mut dx = vec![0f32; xs.len()];
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS * h)
            .zip(xs.par_chunks(ROWS * h).zip(gs.par_chunks(ROWS * h)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let r = self.inverse_rms(x);
                    let dot: f32 = (0..h).map(|i| g[i] * ws[i] * (x[i] * r)).sum();
                    let mean = dot / h as f32;
                    for i in 0..h {
                        let xhat = x[i] * r;
                        dx[i] = r * (g[i] * ws[i] - xhat * mean);
                        dw[i] += g[i] * xhat;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; h];
        for part in &dw_parts {
            dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
        }
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = w.track_op().then(|| Tensor::from_vec(dw, w.shape(), w.device())).transpose()?;
        Ok((Some(dx), dw))
    }
}

/// Rotary position embedding in transformers' rotate_half layout: `x·cos + rotate_half(x)·sin` for `x: [batch,
/// heads, seq, head_dim]` and the tables' rows of those positions, `cos, sin: [seq, head_dim]`, where
/// `rotate_half([x1, x2]) = [−x2, x1]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x, cos, sin]) {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        return Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?);
    }
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary)?)
}

struct Rotary;

impl Rotary {
    /// Rotate each `[seq, head_dim]` block of `x` into `out`: `out = x·cos + rotate_half(x)·sin`, or with
    /// `inverse`, the transpose of that map (its gradient): `out = x·cos + rotate_halfᵀ(x·sin)`.
    fn run(x: &[f32], cos: &[f32], sin: &[f32], d: usize, inverse: bool) -> Vec<f32> {
        let half = d / 2;
        let table = cos.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(table).zip(x.par_chunks(table)).for_each(|(out, x)| {
            for ((o, x), (c, s)) in out.chunks_mut(d).zip(x.chunks(d)).zip(cos.chunks(d).zip(sin.chunks(d))) {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    if inverse {
                        o[i] = a * c[i] + b * s[i + half];
                        o[i + half] = b * c[i + half] - a * s[i];
                    } else {
                        o[i] = a * c[i] - b * s[i];
                        o[i + half] = b * c[i + half] + a * s[i + half];
                    }
                }
            }
        });
        out
    }
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "vicuna-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (f32_slice(s1, l1, "rotary")?, f32_slice(s2, l2, "rotary")?, f32_slice(s3, l3, "rotary")?);
        let &[_, _, seq, d] = l1.dims() else { candle_core::bail!("rotary: [batch, heads, seq, head_dim] only") };
        if l2.dims() != [seq, d] || l3.dims() != [seq, d] || d % 2 != 0 {
            candle_core::bail!("rotary: tables {:?} / {:?} for input {:?}", l2.dims(), l3.dims(), l1.dims());
        }
        Ok((CpuStorage::F32(Self::run(x, cos, sin, d, false)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gd, cd, sd) = (data(&grad), data(cos), data(sin));
        let dx = Self::run(gd.slice()?, cd.slice()?, sd.slice()?, x.dim(D::Minus1)?, true);
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None, None))
    }
}

/// SwiGLU's gate: `silu(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[gate, up]) || gate.shape() != up.shape() {
        return Ok(((gate / (gate.neg()?.exp()? + 1.0)?)? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}

struct SwiGlu;

const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "vicuna-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "swiglu")?, f32_slice(s2, l2, "swiglu")?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gd, ud, dd) = (data(gate), data(up), data(&grad));
        let (gs, us, ds) = (gd.slice()?, ud.slice()?, dd.slice()?);
        let (mut dg, mut du) = (vec![0f32; gs.len()], vec![0f32; gs.len()]);
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
            let base = c * CHUNK;
            for i in 0..dg.len() {
                let (g, u, d) = (gs[base + i], us[base + i], ds[base + i]);
                let s = sigmoid(g);
                // silu'(g) = s + g·s·(1 − s)
                dg[i] = d * u * (s + g * s * (1.0 - s));
                du[i] = d * g * s;
            }
        });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// Causal self-attention from position 0: `softmax(q·kᵀ · scale + mask) · v` for `q, k, v: [batch, heads, seq,
/// head_dim]` (the same number of heads; repeat grouped key/value heads first).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention { scale: scale as f32, probs: Arc::new(OnceLock::new()) };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    scale: f32,
    /// The softmax of every (batch, head), `[batch · heads, seq, seq]`, from the forward pass for the backward.
    probs: Arc<OnceLock<Vec<f32>>>,
}

impl Attention {
    fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let &[b, h, s, d] = l.dims() else { candle_core::bail!("attention: [batch, heads, seq, head_dim] only") };
        Ok((b * h, s, d))
    }
}

/// A row-major block of one (batch, head).
fn block(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::row_major(data, rows, cols).expect("a (batch, head) block")
}

/// `out = a · b`, on this thread (the caller is one task of a parallel loop).
fn product(a: MatRef, b: MatRef, out: &mut [f32]) {
    sgemm_serial(a, b, out, false).expect("block shapes agree");
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "vicuna-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) =
            (f32_slice(s1, l1, "attention")?, f32_slice(s2, l2, "attention")?, f32_slice(s3, l3, "attention")?);
        let (bh, s, d) = Self::dims(l1)?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!("attention: q {:?}, k {:?}, v {:?} differ", l1.dims(), l2.dims(), l3.dims());
        }
        let mut probs = vec![0f32; bh * s * s];
        let mut out = vec![0f32; bh * s * d];
        probs.par_chunks_mut(s * s).zip(out.par_chunks_mut(s * d)).enumerate().for_each(|(i, (p, o))| {
            let (q, k, v) = (&q[i * s * d..][..s * d], &k[i * s * d..][..s * d], &v[i * s * d..][..s * d]);
            product(block(q, s, d), block(k, s, d).t(), p);
            for (row, r) in p.chunks_mut(s).enumerate() {
                let seen = &mut r[..=row];
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * self.scale));
                let mut sum = 0f32;
                for x in seen.iter_mut() {
                    *x = (*x * self.scale - max).exp();
                    sum += *x;
                }
                seen.iter_mut().for_each(|x| *x /= sum);
                r[row + 1..].fill(0.0);
            }
            product(block(p, s, s), block(v, s, d), o);
        });
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self.probs.get().ok_or_else(|| candle_core::Error::Msg("attention: no forward pass".into()))?;
        let grad = grad.contiguous()?;
        let (qd, kd, vd, gd) = (data(q), data(k), data(v), data(&grad));
        let (qs, ks, vs, gs) = (qd.slice()?, kd.slice()?, vd.slice()?, gd.slice()?);
        let (bh, s, d) = Self::dims(q.layout())?;
        let (mut dq, mut dk, mut dv) = (vec![0f32; bh * s * d], vec![0f32; bh * s * d], vec![0f32; bh * s * d]);
        dq.par_chunks_mut(s * d).zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d))).enumerate().for_each(
            |(i, (dq, (dk, dv)))| {
                let head = i * s * d..(i + 1) * s * d;
                let (q, k, v, g) = (&qs[head.clone()], &ks[head.clone()], &vs[head.clone()], &gs[head]);
                let p = &probs[i * s * s..][..s * s];
                // dV = Pᵀ·dO; dP = dO·Vᵀ; dS = P ∘ (dP − rowsum(dP ∘ P)) · scale; dQ = dS·K; dK = dSᵀ·Q.
                product(block(p, s, s).t(), block(g, s, d), dv);
                let mut ds = vec![0f32; s * s];
                product(block(g, s, d), block(v, s, d).t(), &mut ds);
                for (row, (r, pr)) in ds.chunks_mut(s).zip(p.chunks(s)).enumerate() {
                    let dot: f32 = r[..=row].iter().zip(&pr[..=row]).map(|(a, b)| a * b).sum();
                    for (x, &pv) in r[..=row].iter_mut().zip(&pr[..=row]) {
                        *x = pv * (*x - dot) * self.scale;
                    }
                    r[row + 1..].fill(0.0);
                }
                product(block(&ds, s, s), block(k, s, d), dq);
                product(block(&ds, s, s).t(), block(q, s, d), dk);
            },
        );
        let make = |data, like: &Tensor| Tensor::from_vec(data, like.shape(), like.device());
        Ok((Some(make(dq, q)?), Some(make(dk, k)?), Some(make(dv, v)?)))
    }
}
