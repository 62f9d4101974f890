//! dequantize(quantize(x)) stays within each format's error bound.

use vicuna_kernels::{dequantize_row, quantize_row, row_size, GgmlType};

/// Roughly normal values (sum of four uniforms), deterministic.
fn normal_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| ((0..4).map(|_| uniform()).sum::<f32>() - 2.0) * 0.7).collect()
}

fn roundtrip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let mut bytes = vec![0u8; row_size(ty, x.len()).unwrap()];
    quantize_row(ty, x, &mut bytes).unwrap();
    let mut back = vec![0f32; x.len()];
    dequantize_row(ty, &bytes, &mut back).unwrap();
    back
}

/// Root-mean-square error relative to the root-mean-square value.
fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let norm: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn relative_error_is_within_each_formats_bound() {
    let x = normal_values(64 * 256, 11);
    // What ggml's reference quantizers reach on this data (bits per weight in brackets); the error must stay within
    // 15% above it, and not fall below half of it (which would mean the format is not what it claims to be).
    for (ty, typical) in [
        (GgmlType::F16, 2.1e-4),   // 16
        (GgmlType::BF16, 1.65e-3), // 16
        (GgmlType::Q8_0, 5.07e-3), // 8.5
        (GgmlType::Q6_K, 1.70e-2), // 6.56
        (GgmlType::Q5_0, 4.06e-2), // 5.5
        (GgmlType::Q5_1, 3.64e-2), // 6
        (GgmlType::Q5_K, 3.47e-2), // 5.5
        (GgmlType::Q4_0, 8.15e-2), // 4.5
        (GgmlType::Q4_1, 7.59e-2), // 5
        (GgmlType::Q4_K, 6.90e-2), // 4.5
        (GgmlType::Q3_K, 0.144),   // 3.44
        (GgmlType::Q2_K, 0.289),   // 2.56
    ] {
        let e = relative_rmse(&x, &roundtrip(ty, &x));
        assert!(e <= typical * 1.15, "{ty}: relative RMS error {e:.5}, expected about {typical}");
        assert!(e >= typical * 0.5, "{ty}: relative RMS error {e:.2e} implausibly small for the format");
    }
}

#[test]
fn legacy_formats_stay_within_one_step_per_value() {
    let x = normal_values(32 * 64, 12);
    for (ty, levels) in [(GgmlType::Q8_0, 127.0f32), (GgmlType::Q4_0, 8.0), (GgmlType::Q5_0, 16.0)] {
        let y = roundtrip(ty, &x);
        for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // One step (the f16-rounded scale amax / levels) for the value clamped at the positive end; half a
            // step for every other value, plus the scale's own f16 rounding.
            let step = amax / levels * (1.0 + 1e-3);
            for (a, b2) in xb.iter().zip(yb) {
                assert!((a - b2).abs() <= step, "{ty} block {b}: {a} came back as {b2} (step {step})");
            }
        }
    }
}

#[test]
fn all_zero_input_stays_zero() {
    let x = vec![0.0f32; 512];
    for ty in GgmlType::ALL {
        if ty == GgmlType::Q8_K || !ty.is_quantized() && ty != GgmlType::F16 {
            continue;
        }
        assert!(roundtrip(ty, &x).iter().all(|&v| v == 0.0), "{ty}");
    }
}
