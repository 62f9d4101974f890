//! AdamW (decoupled weight decay, PyTorch's `torch.optim.AdamW` update), the learning-rate
//! schedule (linear warmup then cosine decay) and gradient-norm clipping. The moments are plain
//! tensors so a checkpoint can save and restore them exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{bail, Result};

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
    /// First and second moments per variable, in the order of the variables given to `step`.
    moments: Vec<(Tensor, Tensor)>,
    /// Updates done so far (bias correction uses it).
    pub steps: usize,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(AdamW { params, moments, steps: 0 })
    }

    /// One update of every variable with its gradient.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
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
        for ((var, g), (m, v)) in vars.iter().zip(grads).zip(self.moments.iter_mut()) {
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&*m / bias1)?;
            let v_hat = (&*v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments by variable name, for a checkpoint.
    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        names
            .iter()
            .zip(&self.moments)
            .flat_map(|(n, (m, v))| [(format!("exp_avg.{n}"), m.clone()), (format!("exp_avg_sq.{n}"), v.clone())])
            .collect()
    }

    pub fn load_state(&mut self, names: &[String], saved: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for (n, (m, v)) in names.iter().zip(self.moments.iter_mut()) {
            let (Some(sm), Some(sv)) = (saved.get(&format!("exp_avg.{n}")), saved.get(&format!("exp_avg_sq.{n}")))
            else {
                bail!("optimizer checkpoint has no moments for {n}");
            };
            *m = sm.clone();
            *v = sv.clone();
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

/// Scale the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`, which scales by `max_norm / (norm + 1e-6)`); returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
