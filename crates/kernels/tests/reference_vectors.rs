//! Quantizers, dequantizers and scalar dot products against vectors made by libggml itself
//! (`tests/data/make_reference.py`, which also checks them against gguf-py's numpy ports).

use vicuna_kernels::{dequantize_row, quantize_row, GgmlType};

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn f32s(name: &str) -> Vec<f32> {
    data(name).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn assert_bits_eq(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.to_bits(), e.to_bits(), "{what}: element {i}: {a} != {e}");
    }
}

const BLOCK_FORMATS: [GgmlType; 11] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

#[test]
fn quantizers_match_ggml_reference_byte_for_byte() {
    let weights = f32s("weights.f32");
    for ty in BLOCK_FORMATS {
        let expected = data(&format!("{}.quant.bin", ty.name()));
        let mut actual = vec![0u8; expected.len()];
        quantize_row(ty, &weights, &mut actual).unwrap();
        let block = ty.block_bytes();
        for (i, (a, e)) in actual.chunks(block).zip(expected.chunks(block)).enumerate() {
            assert_eq!(a, e, "{ty}: block {i} differs from ggml's quantize_row_{}_ref", ty.name());
        }
    }
}

#[test]
fn dequantizers_match_ggml_bit_for_bit() {
    for ty in BLOCK_FORMATS {
        for (bytes, floats) in [("quant.bin", "dequant.f32"), ("random.bin", "random.f32")] {
            let src = data(&format!("{}.{bytes}", ty.name()));
            let expected = f32s(&format!("{}.{floats}", ty.name()));
            let mut actual = vec![0f32; expected.len()];
            dequantize_row(ty, &src, &mut actual).unwrap();
            assert_bits_eq(&actual, &expected, &format!("{ty} {bytes}"));
        }
    }
}

#[test]
fn half_and_bfloat_rows_match_ggml() {
    let weights = f32s("weights.f32");
    for (ty, file) in [(GgmlType::F16, "f16.bin"), (GgmlType::BF16, "bf16.bin")] {
        let expected = data(file);
        let mut actual = vec![0u8; expected.len()];
        quantize_row(ty, &weights, &mut actual).unwrap();
        assert_eq!(actual, expected, "{ty}");
        let mut back = vec![0f32; weights.len()];
        dequantize_row(ty, &actual, &mut back).unwrap();
        for (b, w) in back.iter().zip(&weights) {
            let tolerance = if ty == GgmlType::F16 { 1.0 / 1024.0 } else { 1.0 / 128.0 };
            assert!((b - w).abs() <= w.abs() * tolerance + 1e-7, "{ty}: {w} came back as {b}");
        }
    }
}

#[test]
fn activation_quantizers_match_ggml() {
    let x = f32s("activations.f32");
    for (ty, file) in [(GgmlType::Q8_0, "act.q8_0.bin"), (GgmlType::Q8_K, "act.q8_K.bin")] {
        let expected = data(file);
        let mut actual = vec![0u8; expected.len()];
        quantize_row(ty, &x, &mut actual).unwrap();
        assert_eq!(actual, expected, "{ty}");
    }
}

#[test]
fn shapes_are_checked() {
    let mut out = vec![0u8; 18];
    assert!(quantize_row(GgmlType::Q4_0, &[0.0; 31], &mut out).is_err());
    assert!(quantize_row(GgmlType::Q4_0, &[0.0; 64], &mut out).is_err());
    let mut floats = vec![0f32; 32];
    assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut floats).is_err());
    assert_eq!(vicuna_kernels::row_size(GgmlType::Q4_K, 5120).unwrap(), 20 * 144);
    assert!(vicuna_kernels::row_size(GgmlType::Q4_K, 5000).is_err());
    assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4_K));
    assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    assert_eq!(GgmlType::from_id(4), None);
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
}
