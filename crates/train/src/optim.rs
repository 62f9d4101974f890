//! AdamW (decoupled weight decay, PyTorch's `torch.optim.AdamW` update), the learning-rate
//! schedule (linear warmup then cosine decay) and gradient-norm clipping. The update is one fused
//! pass per variable, in place, over f32 moments the optimizer keeps as plain vectors (a
//! checkpoint saves and restores them exactly).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use crate::error::{bail, Result};
use crate::fused::{adamw_chunk, grads_sum_sq, AdamWStep, PAR_CHUNK};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// trlX's defaults (`default_configs.py`): betas (0.9, 0.95), eps 1e-8, weight decay 1e-6.
    fn default() -> Self {
        AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 1e-6 }
    }
}

pub struct AdamW {
    pub params: AdamWParams,
    /// First and second moments per variable, in the order of the variables given to `step`
    /// (flat f32, updated in place by the fused step).
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    /// Each variable's shape (the moments are saved with it).
    shapes: Vec<candle_core::Shape>,
    /// Updates done so far (bias correction uses it).
    pub steps: usize,
}

/// `var ← AdamW(var, grad)` in one pass over the variable, its gradient and its moments, in
/// place (candle's in-place op on the variable's storage; the moments are the optimizer's own).
struct FusedAdamW<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    k: AdamWStep,
}

impl candle_core::InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        src_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage::F32;
        let (F32(p), F32(g)) = (dst, src) else { candle_core::bail!("fused AdamW: f32 variables only") };
        let (Some((p0, p1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets()) else {
            candle_core::bail!("fused AdamW: contiguous variables and gradients only")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "fused AdamW: {} values, {} gradients, {}/{} moments",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let k = &self.k;
        p.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .zip(m.par_chunks_mut(PAR_CHUNK))
            .zip(v.par_chunks_mut(PAR_CHUNK))
            .for_each(|(((p, g), m), v)| adamw_chunk(p, g, m, v, k));
        Ok(())
    }
}

/// `n` zeros written now, not `vec![0.0; n]`'s lazily zeroed pages: the first update reads each
/// moment before writing it, and a read-then-written zero page costs a copy-on-write fault and a TLB
/// shootdown on every other core of the process (9% of a 10-step 58M run on 2 threads, measured
/// with `perf`), where a page first touched by a write costs one plain fault, here.
/// (A plain fill would not do: the compiler turns allocate-then-zero into `calloc`.)
fn touched_zeros(n: usize) -> Vec<f32> {
    let mut zeros = vec![0f32; n];
    // One volatile write per 4 KiB page.
    for x in zeros.iter_mut().step_by(1024) {
        // SAFETY: `x` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(x, 0.0) };
    }
    zeros
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| {
                if v.dtype() != DType::F32 {
                    bail!("optimizer: f32 variables only, not {:?}", v.dtype());
                }
                let n = v.elem_count();
                Ok((touched_zeros(n), touched_zeros(n)))
            })
            .collect::<Result<_>>()?;
        let shapes = vars.iter().map(|v| v.shape().clone()).collect();
        Ok(AdamW { params, moments, shapes, steps: 0 })
    }

    /// One update of every variable with its gradient.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(vars, grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` first (gradient clipping
    /// without a scaled copy of the gradients). PyTorch's `torch.optim.AdamW`:
    /// `θ ← θ(1 − lr·λ)`, `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
    /// `θ ← θ − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)`.
    pub fn step_scaled(&mut self, vars: &[Var], grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if vars.len() != self.moments.len() || grads.len() != vars.len() {
            bail!(
                "optimizer: {} variables, {} gradients, {} moment pairs",
                vars.len(),
                grads.len(),
                self.moments.len()
            );
        }
        self.steps += 1;
        let p = self.params;
        let bias1 = 1.0 - p.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - p.beta2.powi(self.steps as i32);
        let k = AdamWStep {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            step_size: (lr / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: p.eps as f32,
            decay: (1.0 - lr * p.weight_decay) as f32,
            grad_scale: grad_scale as f32,
        };
        for ((var, g), (m, v)) in vars.iter().zip(grads).zip(self.moments.iter_mut()) {
            if g.dims() != var.dims() {
                bail!("optimizer: gradient of shape {:?} for a variable of shape {:?}", g.dims(), var.dims());
            }
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            let op = FusedAdamW { m: RefCell::new(m.as_mut_slice()), v: RefCell::new(v.as_mut_slice()), k };
            var.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }

    /// Moments by variable name, for a checkpoint.
    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        names
            .iter()
            .zip(self.moments.iter().zip(&self.shapes))
            .flat_map(|(n, ((m, v), shape))| {
                let t = |x: &Vec<f32>| {
                    Tensor::from_slice(x, shape.clone(), &candle_core::Device::Cpu).expect("moments match their shape")
                };
                [(format!("exp_avg.{n}"), t(m)), (format!("exp_avg_sq.{n}"), t(v))]
            })
            .collect()
    }

    pub fn load_state(&mut self, names: &[String], saved: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for (n, (m, v)) in names.iter().zip(self.moments.iter_mut()) {
            let (Some(sm), Some(sv)) = (saved.get(&format!("exp_avg.{n}")), saved.get(&format!("exp_avg_sq.{n}")))
            else {
                bail!("optimizer checkpoint has no moments for {n}");
            };
            for (dst, src) in [(m, sm), (v, sv)] {
                let src: Vec<f32> = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if src.len() != dst.len() {
                    bail!("optimizer checkpoint: moments of {n} hold {} values, the variable {}", src.len(), dst.len());
                }
                *dst = src;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based): linear warmup from 0 over `warmup` steps,
/// then cosine decay from `base` to `min` at `total` steps.
pub fn cosine_with_warmup(step: usize, total: usize, warmup: usize, base: f64, min: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Each variable's gradient (zeros for one the loss does not reach).
pub fn gradients(grads: &GradStore, vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// Add `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut Option<Vec<Tensor>>, more: Vec<Tensor>) -> Result<()> {
    match acc {
        None => *acc = Some(more),
        Some(sum) => {
            for (s, g) in sum.iter_mut().zip(more) {
                *s = (&*s + g)?;
            }
        }
    }
    Ok(())
}

/// Global L2 norm of the gradients (read in place, summed in f64).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(grads_sum_sq(grads)?.sqrt())
}

/// The factor PyTorch's `clip_grad_norm_` scales the gradients by: `max_norm / (norm + 1e-6)` when
/// the norm is above `max_norm` (> 0), else 1.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scale the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`, which scales by `max_norm / (norm + 1e-6)`); returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `torch.optim.AdamW` written out in f64, one element at a time.
    fn textbook(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], t: usize, lr: f64, a: &AdamWParams) {
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * a.weight_decay;
            m[i] = a.beta1 * m[i] + (1.0 - a.beta1) * g[i];
            v[i] = a.beta2 * v[i] + (1.0 - a.beta2) * g[i] * g[i];
            let m_hat = m[i] / (1.0 - a.beta1.powi(t as i32));
            let v_hat = v[i] / (1.0 - a.beta2.powi(t as i32));
            p[i] -= lr * m_hat / (v_hat.sqrt() + a.eps);
        }
    }

    #[test]
    fn fused_adamw_matches_the_textbook_update() {
        let mut rng = vicuna_engine::Rng::new(11);
        let mut draw = |n: usize, s: f64| -> Vec<f64> { (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) * s).collect() };
        let a = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        // Sizes around the parallel chunk, a ragged tail, and one tiny tensor.
        let shapes: [&[usize]; 3] = [&[3, 7], &[PAR_CHUNK + 37], &[40, 1000]];
        let init: Vec<Vec<f64>> = shapes.iter().map(|s| draw(s.iter().product(), 1.0)).collect();
        let vars: Vec<Var> = init
            .iter()
            .zip(shapes)
            .map(|(x, s)| Var::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), s, &Device::Cpu).unwrap())
            .collect();
        let mut opt = AdamW::new(&vars, a).unwrap();
        let mut p: Vec<Vec<f64>> = vars
            .iter()
            .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect())
            .collect();
        let mut m: Vec<Vec<f64>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
        let mut v = m.clone();
        for step in 1..=5 {
            let lr = 1e-2 / step as f64;
            // Gradients of very different sizes, some entries exactly 0; every other step clipped.
            let scale = if step % 2 == 0 { 0.25 } else { 1.0 };
            let grads: Vec<Vec<f64>> = p
                .iter()
                .map(|x| {
                    draw(x.len(), 10f64.powi(step as i32 - 3))
                        .into_iter()
                        .enumerate()
                        .map(|(i, g)| if i % 5 == 0 { 0.0 } else { g })
                        .collect()
                })
                .collect();
            let tensors: Vec<Tensor> = grads
                .iter()
                .zip(shapes)
                .map(|(g, s)| {
                    Tensor::from_vec(g.iter().map(|&x| x as f32).collect::<Vec<_>>(), s, &Device::Cpu).unwrap()
                })
                .collect();
            opt.step_scaled(&vars, &tensors, lr, scale).unwrap();
            for i in 0..vars.len() {
                // The reference sees the same f32-rounded gradient, scaled.
                let g: Vec<f64> = grads[i].iter().map(|&x| (x as f32) as f64 * scale).collect();
                textbook(&mut p[i], &mut m[i], &mut v[i], &g, step, lr, &a);
                let got: Vec<f32> = vars[i].flatten_all().unwrap().to_vec1().unwrap();
                for (j, (&x, &want)) in got.iter().zip(&p[i]).enumerate() {
                    let err = (x as f64 - want).abs();
                    assert!(err <= 1e-6 * want.abs().max(1e-2), "step {step}, tensor {i}[{j}]: {x} vs {want}");
                }
            }
        }
        assert_eq!(opt.steps, 5);
        // The saved moments are the reference's, in the variables' shapes.
        let names: Vec<String> = (0..vars.len()).map(|i| format!("t{i}")).collect();
        let state = opt.state(&names);
        assert_eq!(state[4].1.dims(), &[40, 1000]);
        let saved: Vec<f32> = state[2].1.flatten_all().unwrap().to_vec1().unwrap();
        let scale = m[1].iter().fold(0f64, |a, b| a.max(b.abs()));
        for (&x, &want) in saved.iter().zip(&m[1]) {
            // Relative to the tensor's scale: m sums gradients of both signs, in f32 here.
            assert!((x as f64 - want).abs() <= 1e-6 * scale, "moment {x} vs {want} (scale {scale})");
        }
        // And they load back exactly.
        let map: HashMap<String, Tensor> = state.into_iter().collect();
        let mut other = AdamW::new(&vars, a).unwrap();
        other.load_state(&names, &map, 5).unwrap();
        assert_eq!(other.moments, opt.moments);
    }

    #[test]
    fn clipping_scale_and_norm() {
        let g = vec![Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(), Tensor::new(&[[4f32]], &Device::Cpu).unwrap()];
        assert!((grad_norm(&g).unwrap() - 5.0).abs() < 1e-12);
        assert_eq!(clip_scale(5.0, 10.0), 1.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0);
        assert!((clip_scale(5.0, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
        let mut g = g;
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-6);
    }
}
