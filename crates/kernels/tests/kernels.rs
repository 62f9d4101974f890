//! The matmul kernels: the scalar reference against exact arithmetic and against ggml, every SIMD level against the
//! scalar one on ragged shapes, the multi-row kernels against the one-row kernels bit for bit, and multi-threaded
//! runs against single-threaded ones bit for bit.

use vicuna_kernels::{
    dequantize_row, matmul_path, matmul_with, quantize_row, row_size, GgmlType, Isa, MatmulPath, QuantMatrix,
    ThreadPool, ThreadPoolBuilder,
};

/// A small deterministic generator (64-bit LCG, top bits), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal values with occasional outliers, like real weights and activations.
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let g = (0..4).map(|_| self.next_f32()).sum::<f32>() - 2.0;
                if self.next_f32() < 0.01 {
                    g * scale * 8.0
                } else {
                    g * scale
                }
            })
            .collect()
    }
}

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn quantized_matrix(ty: GgmlType, rows: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let values = rng.values(rows * k, 0.05);
    let mut data = vec![0u8; rows * row_size(ty, k).unwrap()];
    let row_bytes = row_size(ty, k).unwrap();
    for (src, dst) in values.chunks_exact(k).zip(data.chunks_exact_mut(row_bytes)) {
        quantize_row(ty, src, dst).unwrap();
    }
    data
}

/// What the kernels multiply the weights with: the activations after the quantization ggml applies for `ty`.
fn effective_activations(ty: GgmlType, x: &[f32], k: usize) -> Vec<f32> {
    let act_ty = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_K | GgmlType::Q6_K => GgmlType::Q8_K,
        _ => return x.to_vec(),
    };
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let mut bytes = vec![0u8; row_size(act_ty, k).unwrap()];
        quantize_row(act_ty, src, &mut bytes).unwrap();
        dequantize_row(act_ty, &bytes, dst).unwrap();
    }
    out
}

/// Exact products (in f64) and, per output, the sum of |terms| that float rounding errors scale with.
fn exact_product(ty: GgmlType, data: &[u8], rows: usize, k: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let row_bytes = row_size(ty, k).unwrap();
    let xe = effective_activations(ty, x, k);
    let mut w = vec![0f32; k];
    let (mut exact, mut magnitude) = (vec![0f64; n * rows], vec![0f64; n * rows]);
    for r in 0..rows {
        dequantize_row(ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut w).unwrap();
        for c in 0..n {
            let xc = &xe[c * k..(c + 1) * k];
            exact[c * rows + r] = w.iter().zip(xc).map(|(&a, &b)| a as f64 * b as f64).sum();
            magnitude[c * rows + r] = w.iter().zip(xc).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        }
    }
    (exact, magnitude)
}

fn assert_close(actual: &[f32], expected: &[f64], magnitude: &[f64], what: &str) {
    for (i, ((&a, &e), &m)) in actual.iter().zip(expected).zip(magnitude).enumerate() {
        let tolerance = 2e-6 * m + 1e-30;
        assert!((a as f64 - e).abs() <= tolerance, "{what}: output {i}: {a} vs {e} (tolerance {tolerance:e})");
    }
}

const ALL_WEIGHT_TYPES: [GgmlType; 13] = [
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q5_K,
];

/// Row lengths: 1, 3, 5 and 17 blocks of 32 (odd counts leave a half pair), 1, 3 and 5 super-blocks.
fn lengths(ty: GgmlType) -> &'static [usize] {
    if ty.block_size() == 256 {
        &[256, 768, 1280]
    } else {
        &[32, 96, 160, 544]
    }
}

#[test]
fn scalar_kernels_compute_the_exact_product() {
    let single = pool(1);
    let mut rng = Rng(1);
    for ty in ALL_WEIGHT_TYPES {
        for &k in lengths(ty) {
            let (rows, n) = (19, 3);
            let data = quantized_matrix(ty, rows, k, &mut rng);
            let x = rng.values(n * k, 1.0);
            let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
            let mut out = vec![0f32; n * rows];
            matmul_with(Isa::Scalar, &w, &x, n, &mut out, &single).unwrap();
            let (exact, magnitude) = exact_product(ty, &data, rows, k, &x, n);
            assert_close(&out, &exact, &magnitude, &format!("scalar {ty} k={k}"));
        }
    }
}

#[test]
fn simd_kernels_match_scalar_on_ragged_shapes() {
    let single = pool(1);
    let mut rng = Rng(2);
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !isa.is_available() {
            eprintln!("skipping {isa:?}: not available on this CPU");
            continue;
        }
        for ty in ALL_WEIGHT_TYPES {
            for &k in lengths(ty) {
                for (rows, n) in [(1, 1), (7, 2), (16, 3), (5, 4), (17, 5), (23, 6), (9, 7), (33, 8), (70, 17), (40, 9)]
                {
                    let data = quantized_matrix(ty, rows, k, &mut rng);
                    let x = rng.values(n * k, 1.0);
                    let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
                    let (mut reference, mut out) = (vec![0f32; n * rows], vec![f32::NAN; n * rows]);
                    matmul_with(Isa::Scalar, &w, &x, n, &mut reference, &single).unwrap();
                    matmul_with(isa, &w, &x, n, &mut out, &single).unwrap();
                    let (_, magnitude) = exact_product(ty, &data, rows, k, &x, n);
                    let reference: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
                    assert_close(&out, &reference, &magnitude, &format!("{isa:?} {ty} k={k} rows={rows} n={n}"));
                }
            }
        }
    }
}

/// The types with multi-row kernels, and two without (which must still take whatever path `MultiRow` gives them).
const MULTI_ROW_TYPES: [GgmlType; 6] =
    [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::F16, GgmlType::Q5_K];

/// Every instruction-set level this CPU has, the scalar reference first.
fn available_isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|isa| isa.is_available()).collect()
}

/// `n` single-row products, one per activation row, laid out as one `n`-row product.
fn row_by_row(isa: Isa, w: &QuantMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let (rows, k) = (w.rows(), w.cols());
    let mut out = vec![f32::NAN; n * rows];
    for c in 0..n {
        matmul_with(isa, w, &x[c * k..(c + 1) * k], 1, &mut out[c * rows..(c + 1) * rows], &pool(1)).unwrap();
    }
    out
}

#[test]
fn multi_row_kernels_equal_one_row_kernels_bit_for_bit() {
    // The multi-row kernels share only the (exact) unpacking between activation rows; per row they do the one-row
    // kernel's float operations in its order, so any number of rows, in any passes, gives the one-row bits.
    let single = pool(1);
    let mut rng = Rng(5);
    for isa in available_isas() {
        for ty in MULTI_ROW_TYPES {
            for &k in lengths(ty) {
                for (rows, n) in [(1, 2), (7, 3), (17, 4), (33, 5), (5, 6), (23, 7), (40, 8), (9, 9), (3, 13)] {
                    let data = quantized_matrix(ty, rows, k, &mut rng);
                    let x = rng.values(n * k, 1.0);
                    let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
                    let expected = row_by_row(isa, &w, &x, n);
                    let mut out = vec![f32::NAN; n * rows];
                    matmul_path(isa, MatmulPath::MultiRow, &w, &x, n, &mut out, &single).unwrap();
                    let same = out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {ty} k={k} rows={rows} n={n}: multi-row differs from row by row");
                }
            }
        }
    }
}

#[test]
fn simd_multi_row_kernels_match_scalar() {
    let single = pool(1);
    let mut rng = Rng(6);
    for isa in available_isas().into_iter().filter(|&isa| isa != Isa::Scalar) {
        for ty in MULTI_ROW_TYPES {
            for &k in lengths(ty) {
                for n in 2..=9 {
                    // Weight-row counts that are not multiples of anything the kernels or the chunks use.
                    let rows = [1, 3, 7, 13, 19, 29, 37, 45][n - 2];
                    let data = quantized_matrix(ty, rows, k, &mut rng);
                    let x = rng.values(n * k, 1.0);
                    let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
                    let (mut reference, mut out) = (vec![0f32; n * rows], vec![f32::NAN; n * rows]);
                    matmul_path(Isa::Scalar, MatmulPath::MultiRow, &w, &x, n, &mut reference, &single).unwrap();
                    matmul_path(isa, MatmulPath::MultiRow, &w, &x, n, &mut out, &single).unwrap();
                    let (_, magnitude) = exact_product(ty, &data, rows, k, &x, n);
                    let reference: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
                    assert_close(&out, &reference, &magnitude, &format!("{isa:?} {ty} k={k} rows={rows} n={n}"));
                }
            }
        }
    }
}

#[test]
fn any_batch_size_equals_single_rows() {
    // What `matmul` does for 1..=17 activation rows (row kernels, multi-row kernels or the GEMM, whichever it picks)
    // against one row at a time: the same bits where it keeps to the row kernels' arithmetic, within rounding where
    // the GEMM sums in its own order. Large enough for both threads of a two-thread pool to take chunks.
    let two = pool(2);
    let mut rng = Rng(7);
    for isa in available_isas() {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
            let (rows, k) = (301, 1024);
            let data = quantized_matrix(ty, rows, k, &mut rng);
            let x = rng.values(17 * k, 1.0);
            let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
            for n in 1..=17 {
                let x = &x[..n * k];
                let expected = row_by_row(isa, &w, x, n);
                let mut out = vec![f32::NAN; n * rows];
                matmul_with(isa, &w, x, n, &mut out, &two).unwrap();
                let mut gemm = vec![f32::NAN; n * rows];
                matmul_path(isa, MatmulPath::Gemm, &w, x, n, &mut gemm, &two).unwrap();
                let same = out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                let what = format!("{isa:?} {ty} n={n}");
                if !same {
                    // Only the GEMM may differ, and then `matmul` must have taken it.
                    assert!(isa == Isa::Avx512, "{what}: differs from row by row");
                    assert!(out.iter().zip(&gemm).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: not the GEMM");
                }
                let (_, magnitude) = exact_product(ty, &data, rows, k, x, n);
                let expected: Vec<f64> = expected.iter().map(|&v| v as f64).collect();
                assert_close(&out, &expected, &magnitude, &what);
            }
        }
    }
}

#[test]
fn gemm_rows_do_not_depend_on_the_other_activation_rows() {
    // The GEMM takes activation rows 16 at a time, two such tiles per kernel call where there are two: row c of a
    // product must be the same bits whether its tile shared a call (n = 33: tiles 0 and 1 together, tile 2 alone)
    // or not (n = 16, 17: one tile alone, then a pair with a one-row tile).
    let single = pool(1);
    let mut rng = Rng(11);
    if !Isa::Avx512.is_available() {
        eprintln!("skipped: no AVX-512 GEMM on this CPU");
        return;
    }
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let (rows, k) = (45, 512);
        let data = quantized_matrix(ty, rows, k, &mut rng);
        let x = rng.values(33 * k, 1.0);
        let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
        let product = |x: &[f32]| {
            let n = x.len() / k;
            let mut out = vec![f32::NAN; n * rows];
            matmul_path(Isa::Avx512, MatmulPath::Gemm, &w, x, n, &mut out, &single).unwrap();
            out
        };
        let all = product(&x);
        for (first, n) in [(0, 16), (16, 17), (32, 1)] {
            let part = product(&x[first * k..(first + n) * k]);
            let same = part.iter().zip(&all[first * rows..]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty}: activation rows {first}..{} differ with 33 rows in the product", first + n);
        }
    }
}

#[test]
fn threads_do_not_change_results() {
    let mut rng = Rng(3);
    let (single, two, three) = (pool(1), pool(2), pool(3));
    let isa = Isa::detect();
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::F16, GgmlType::Q5_K] {
        // The last shape is large enough for the activations' tiles to be built on several threads too.
        for (rows, k, n) in [(1201, 2048, 1), (401, 2048, 3), (150, 1024, 20), (40, 4096, 35)] {
            let data = quantized_matrix(ty, rows, k, &mut rng);
            let x = rng.values(n * k, 1.0);
            let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
            let mut expected = vec![0f32; n * rows];
            matmul_with(isa, &w, &x, n, &mut expected, &single).unwrap();
            for threads in [&two, &three] {
                let mut out = vec![f32::NAN; n * rows];
                matmul_with(isa, &w, &x, n, &mut out, threads).unwrap();
                let same = out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} {ty} rows={rows} n={n}: {} threads differ", threads.current_num_threads());
            }
        }
    }
}

#[test]
fn calls_from_inside_the_pool_work() {
    // The model may run its whole step inside `pool.install`; a matmul from a worker must not deadlock.
    let mut rng = Rng(4);
    let (rows, k, n) = (600, 2048, 1);
    let data = quantized_matrix(GgmlType::Q4_0, rows, k, &mut rng);
    let x = rng.values(n * k, 1.0);
    let w = QuantMatrix::new(GgmlType::Q4_0, rows, k, &data).unwrap();
    let (single, two) = (pool(1), pool(2));
    let mut expected = vec![0f32; n * rows];
    matmul_with(Isa::detect(), &w, &x, n, &mut expected, &single).unwrap();
    let out = two.install(|| {
        let mut out = vec![f32::NAN; n * rows];
        matmul_with(Isa::detect(), &w, &x, n, &mut out, &two).unwrap();
        out
    });
    assert!(out.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
}

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn f32s(name: &str) -> Vec<f32> {
    data(name).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn scalar_dot_products_match_ggml() {
    let single = pool(1);
    let x = f32s("activations.f32");
    let k = x.len();
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let weights = data(&format!("{}.quant.bin", ty.name()));
        let expected = f32s(&format!("{}.dot.f32", ty.name()));
        let rows = expected.len();
        let w = QuantMatrix::new(ty, rows, k, &weights).unwrap();
        let mut out = vec![0f32; rows];
        matmul_with(Isa::Scalar, &w, &x, 1, &mut out, &single).unwrap();
        for (r, (&a, &e)) in out.iter().zip(&expected).enumerate() {
            if matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0) {
                // Same integer sums, same float operations in the same order as ggml_vec_dot_*_generic.
                assert_eq!(a.to_bits(), e.to_bits(), "{ty} row {r}: {a} != {e}");
            } else {
                assert!((a - e).abs() <= 1e-5 * e.abs().max(1.0), "{ty} row {r}: {a} vs {e}");
            }
        }
    }
}

#[test]
fn shapes_are_checked() {
    let single = pool(1);
    let data = vec![0u8; 2 * 18];
    assert!(QuantMatrix::new(GgmlType::Q4_0, 2, 32, &data).is_ok());
    assert!(QuantMatrix::new(GgmlType::Q4_0, 3, 32, &data).is_err());
    assert!(QuantMatrix::new(GgmlType::Q4_0, 1, 48, &data).is_err());
    let w = QuantMatrix::new(GgmlType::Q4_0, 2, 32, &data).unwrap();
    let mut out = vec![0f32; 2];
    assert!(matmul_with(Isa::Scalar, &w, &[0.0; 31], 1, &mut out, &single).is_err());
    assert!(matmul_with(Isa::Scalar, &w, &[0.0; 32], 1, &mut out[..1], &single).is_err());
    assert!(matmul_with(Isa::Scalar, &w, &[0.0; 32], 1, &mut out, &single).is_ok());
}
