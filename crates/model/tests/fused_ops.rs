//! The training pass's fused ops (linear, RMSNorm, rotary embedding, SwiGLU, causal attention) against the same math built from
//! candle's elementwise ops, whose gradients candle derives itself: values and every gradient agree to f32 rounding.

use vicuna_model::candle_core::{DType, Device, Tensor, Var, D};
use vicuna_model::{causal_attention, linear, rms_norm, rotary, swiglu};

fn random(shape: &[usize], seed: u64) -> Var {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
}

/// A scalar of `out` that weighs every element differently, so every gradient element matters.
fn weighted_sum(out: &Tensor, seed: u64) -> Tensor {
    let weights = random(out.dims(), seed);
    (out * weights.as_tensor()).unwrap().sum_all().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `fused(inputs)` and `reference(inputs)`: equal values, equal gradients for every input.
fn check(name: &str, inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (got, want) = (fused(&tensors), reference(&tensors));
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
    assert!(max_diff(&got, &want) <= 1e-5 * scale, "{name}: values differ by {}", max_diff(&got, &want));
    let (got_grads, want_grads) =
        (weighted_sum(&got, 99).backward().unwrap(), weighted_sum(&want, 99).backward().unwrap());
    for (i, input) in inputs.iter().enumerate() {
        let g = got_grads.get(input).unwrap_or_else(|| panic!("{name}: no gradient for input {i}"));
        let w = want_grads.get(input).unwrap();
        let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
        assert!(max_diff(g, w) <= 1e-5 * scale, "{name}: gradient of input {i} differs by {}", max_diff(g, w));
    }
}

#[test]
fn linear_matches_candle_matmul() {
    for (rows, inner, out) in [(1, 1, 1), (3, 5, 7), (2 * 37, 64, 45), (300, 130, 290)] {
        let x = random(&[2, rows / 2 + 1, inner], 1);
        let w = random(&[out, inner], 2);
        check(
            "linear",
            &[x, w],
            |t| linear(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
        );
    }
}

#[test]
fn rms_norm_matches_the_composed_norm() {
    for (rows, h) in [(1, 1), (5, 8), (70, 64), (33, 130)] {
        let x = random(&[rows, h], 3);
        let w = random(&[h], 4);
        let eps = 1e-6;
        check(
            "rms_norm",
            &[x, w],
            |t| rms_norm(&t[0], &t[1], eps).unwrap(),
            |t| {
                let mean_sq = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let normed = t[0].broadcast_div(&(mean_sq + eps).unwrap().sqrt().unwrap()).unwrap();
                normed.broadcast_mul(&t[1]).unwrap()
            },
        );
    }
}

#[test]
fn rotary_matches_rotate_half() {
    for (batch, heads, seq, d) in [(1, 1, 1, 2), (2, 3, 7, 8), (1, 2, 33, 64)] {
        let x = random(&[batch, heads, seq, d], 12);
        // Tables as the model's: cos and sin of position × frequency, both halves alike.
        let angles: Vec<f32> =
            (0..seq).flat_map(|p| (0..d).map(move |i| p as f32 * 0.3f32.powi((i % (d / 2)) as i32))).collect();
        let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (seq, d), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (seq, d), &Device::Cpu).unwrap();
        check(
            "rotary",
            &[x],
            |t| rotary(&t[0], &cos, &sin).unwrap(),
            |t| {
                let half = d / 2;
                let x1 = t[0].narrow(D::Minus1, 0, half).unwrap();
                let x2 = t[0].narrow(D::Minus1, half, half).unwrap();
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (t[0].broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
            },
        );
    }
}

#[test]
fn swiglu_matches_silu_times_up() {
    for n in [1, 17, 40_000] {
        let gate = random(&[n], 5);
        let up = random(&[n], 6);
        check(
            "swiglu",
            &[gate, up],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| {
                let silu = (&t[0] / (t[0].neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
                (silu * &t[1]).unwrap()
            },
        );
    }
}

#[test]
fn causal_attention_matches_masked_softmax() {
    for (batch, heads, seq, d) in [(1, 1, 1, 4), (2, 3, 5, 8), (1, 2, 40, 16)] {
        let q = random(&[batch, heads, seq, d], 7);
        let k = random(&[batch, heads, seq, d], 8);
        let v = random(&[batch, heads, seq, d], 9);
        let scale = 1.0 / (d as f64).sqrt();
        check(
            "attention",
            &[q, k, v],
            |t| causal_attention(&t[0], &t[1], &t[2], scale).unwrap(),
            |t| {
                let mask: Vec<f32> =
                    (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
                let mask = Tensor::from_vec(mask, (seq, seq), &Device::Cpu).unwrap();
                let scores = t[0].matmul(&t[1].t().unwrap()).unwrap().affine(scale, 0.0).unwrap();
                let scores = scores.broadcast_add(&mask).unwrap();
                let max = scores.max_keepdim(D::Minus1).unwrap().detach();
                let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
                p.matmul(&t[2]).unwrap()
            },
        );
    }
}

#[test]
fn a_frozen_weight_gets_no_gradient() {
    let x = random(&[4, 6], 10);
    let frozen = Tensor::ones((3, 6), DType::F32, &Device::Cpu).unwrap();
    let grads = weighted_sum(&linear(x.as_tensor(), &frozen).unwrap(), 11).backward().unwrap();
    assert!(grads.get(&frozen).is_none());
    assert!(grads.get(x.as_tensor()).is_some());
}
