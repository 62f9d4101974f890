//! Autograd through the whole LLaMA (the model crate's forward pass on training variables) against
//! central finite differences of the loss.
//!
//! The model computes in f32, so the differences use a 4-point stencil (error O(h⁴)) with a step
//! large enough to rise above f32 rounding, the loss summed in f64, and they check (1) each
//! tensor's gradient as a whole, along its own direction, and (2) the entries with the largest
//! gradients of each tensor: all must agree to a relative error below 1e-3.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use vicuna_train::data::TokenizedExample;
use vicuna_train::lm::{gather_logprobs, lm_batch};
use vicuna_train::params::TrainableLlama;

fn tiny_a() -> TrainableLlama {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/models/tiny-a/safetensors-f32"));
    TrainableLlama::load(dir, None, 0, &Device::Cpu).unwrap()
}

fn examples() -> Vec<TokenizedExample> {
    let rows: [&[u32]; 2] = [&[1, 17, 300, 42, 5, 99, 250, 7, 411], &[1, 8, 64, 128, 256, 3, 2]];
    rows.iter()
        .map(|ids| TokenizedExample {
            ids: ids.to_vec(),
            loss_mask: ids.iter().enumerate().map(|(i, _)| i >= 2).collect(),
        })
        .collect()
}

/// Summed NLL of the masked targets, the sum taken in f64 (the tensor part is the training code's).
fn loss_f64(model: &TrainableLlama, ex: &[TokenizedExample]) -> f64 {
    let refs: Vec<&TokenizedExample> = ex.iter().collect();
    let batch = lm_batch(&refs, 0, &Device::Cpu).unwrap();
    let lm = model.frozen_model().unwrap();
    let hidden = lm.forward_hidden(&batch.ids, None).unwrap();
    let s = hidden.dims()[1];
    let logits = lm.logits(&hidden.narrow(1, 0, s - 1).unwrap()).unwrap();
    let lp: Vec<Vec<f32>> = gather_logprobs(&logits, &batch.targets).unwrap().to_vec2().unwrap();
    let mask: Vec<Vec<f32>> = batch.target_mask.to_vec2().unwrap();
    -lp.iter().flatten().zip(mask.iter().flatten()).map(|(l, m)| *l as f64 * *m as f64).sum::<f64>()
}

fn loss_tensor(model: &TrainableLlama, ex: &[TokenizedExample]) -> Tensor {
    let refs: Vec<&TokenizedExample> = ex.iter().collect();
    let batch = lm_batch(&refs, 0, &Device::Cpu).unwrap();
    vicuna_train::lm::summed_nll(&model.model().unwrap(), &batch).unwrap()
}

/// d/dε loss(θ + ε·dir) at 0 by the 4-point stencil.
fn directional_fd(model: &TrainableLlama, ex: &[TokenizedExample], var: &Var, dir: &Tensor, h: f64) -> f64 {
    let base = var.as_tensor().copy().unwrap();
    let at = |eps: f64| {
        var.set(&(&base + (dir * eps).unwrap()).unwrap()).unwrap();
        loss_f64(model, ex)
    };
    let d = (-at(2.0 * h) + 8.0 * at(h) - 8.0 * at(-h) + at(-2.0 * h)) / (12.0 * h);
    var.set(&base).unwrap();
    d
}

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs())
}

#[test]
fn autograd_matches_finite_differences() {
    let model = tiny_a();
    let ex = examples();
    let vars = model.vars();
    let grads = loss_tensor(&model, &ex).backward().unwrap();
    let checked = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let mut worst = 0.0f64;
    for name in checked {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let g = grads.get(var.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        let flat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let norm = flat.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        // (1) along the tensor's own normalized gradient the derivative is ‖g‖.
        let dir = (g.to_dtype(DType::F32).unwrap() / norm).unwrap();
        let fd = directional_fd(&model, &ex, var, &dir, 1e-2);
        let e = rel_err(norm, fd);
        worst = worst.max(e);
        assert!(e < 1e-3, "{name}: ‖grad‖ {norm} vs finite difference {fd} (relative error {e})");
        // (2) the two largest entries one by one.
        let mut order: Vec<usize> = (0..flat.len()).collect();
        order.sort_by(|&a, &b| flat[b].abs().total_cmp(&flat[a].abs()));
        for &i in &order[..2] {
            let mut unit = vec![0f32; flat.len()];
            unit[i] = 1.0;
            let dir = Tensor::from_vec(unit, var.as_tensor().shape(), &Device::Cpu).unwrap();
            let fd = directional_fd(&model, &ex, var, &dir, 1e-2);
            let e = rel_err(flat[i], fd);
            worst = worst.max(e);
            assert!(e < 1e-3, "{name}[{i}]: autograd {} vs finite difference {fd} (relative error {e})", flat[i]);
        }
    }
    eprintln!("worst relative error {worst:.2e}");
}
