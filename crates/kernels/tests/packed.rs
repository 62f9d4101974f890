//! Matrices in the kernels' own layouts (`PackedMatrix`): the scalar reference on them against the exact product,
//! every SIMD level against it bit for bit (one and several activation rows, every path), the GGUF-laid tail rows
//! against the GGUF-layout kernels, and threads against one thread.

use vicuna_kernels::{
    amx_available, dequantize_row, matmul_path, matmul_with, quantize_row, row_size, GgmlType, Isa, Layout, MatmulPath,
    PackedMatrix, QuantMatrix, ThreadPool, ThreadPoolBuilder,
};

/// A small deterministic generator (64-bit LCG, top bits), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }
}

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn quantized(ty: GgmlType, rows: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = row_size(ty, k).unwrap();
    let mut data = vec![0u8; rows * row_bytes];
    for (src, dst) in rng.values(rows * k, 0.1).chunks_exact(k).zip(data.chunks_exact_mut(row_bytes)) {
        quantize_row(ty, src, dst).unwrap();
    }
    data
}

/// The types with an interleaved layout.
const TYPES: [GgmlType; 4] = [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];

/// Shapes of `ty` from (rows, values per row): k-quant rows are whole super-blocks of 256.
fn of_type(ty: GgmlType, (rows, k): (usize, usize)) -> (usize, usize) {
    (rows, if k_quant(ty) { k.next_multiple_of(256) } else { k })
}

fn k_quant(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K)
}

fn isas() -> Vec<Isa> {
    let (isas, skipped): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|isa| isa.is_available());
    if !skipped.is_empty() {
        eprintln!("{skipped:?} not available here: those interleaved kernels are not tested on this machine");
    }
    isas
}

fn product(isa: Isa, path: MatmulPath, w: &QuantMatrix, x: &[f32], n: usize, pool: &ThreadPool) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * w.rows()];
    matmul_path(isa, path, w, x, n, &mut out, pool).unwrap();
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// Rows: one group, a group and a tail, several groups and a tail; blocks per row: 1, 3 and 5 (a lone last block),
/// 2 and 160 (pairs only, as in LLaMA's 5120).
const SHAPES: [(usize, usize); 6] = [(16, 32), (17, 96), (33, 160), (48, 64), (40, 5120), (64, 544)];

#[test]
fn the_scalar_reference_on_interleaved_rows_is_the_exact_product() {
    let single = pool(1);
    let mut rng = Rng(11);
    for (ty, (rows, k)) in TYPES.into_iter().flat_map(|ty| SHAPES.map(|shape| (ty, of_type(ty, shape)))) {
        let data = quantized(ty, rows, k, &mut rng);
        let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
        let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
        let n = 3;
        let x = rng.values(n * k, 2.0);
        let out = product(Isa::Scalar, MatmulPath::Auto, &packed.matrix(), &x, n, &single);
        // The exact product of the weights with the activations as the kernels see them (q8_0, or q8_K for the
        // k-quants).
        let act = if k_quant(ty) { GgmlType::Q8_K } else { GgmlType::Q8_0 };
        let (mut wf, mut xq, mut xf) = (vec![0f32; k], vec![0u8; row_size(act, k).unwrap()], vec![0f32; k]);
        for c in 0..n {
            quantize_row(act, &x[c * k..(c + 1) * k], &mut xq).unwrap();
            dequantize_row(act, &xq, &mut xf).unwrap();
            for r in 0..rows {
                dequantize_row(ty, w.rows_data(r..r + 1), &mut wf).unwrap();
                let exact: f64 = wf.iter().zip(&xf).map(|(&a, &b)| a as f64 * b as f64).sum();
                let magnitude: f64 = wf.iter().zip(&xf).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let got = out[c * rows + r] as f64;
                assert!((got - exact).abs() <= 2e-6 * magnitude + 1e-30, "{ty} {rows}x{k} row {r}: {got} vs {exact}");
            }
        }
    }
}

#[test]
fn every_level_and_path_gives_the_scalar_bits_on_interleaved_rows() {
    let single = pool(1);
    let mut rng = Rng(12);
    for (ty, (rows, k)) in TYPES.into_iter().flat_map(|ty| SHAPES.map(|shape| (ty, of_type(ty, shape)))) {
        let data = quantized(ty, rows, k, &mut rng);
        let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
        let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
        let m = packed.matrix();
        // Fewer activation rows than the GEMM takes (from 10 for q8_0, 11 for q4_0, 14 for q4_K, 17 for q6_K): it
        // sums in another order.
        for n in [1, 2, 3, 5, 8, 9] {
            let x = rng.values(n * k, 2.0);
            // Row by row at the scalar level: the reference, and each activation row alone.
            let expected = product(Isa::Scalar, MatmulPath::RowByRow, &m, &x, n, &single);
            for isa in isas() {
                // The tail rows (after the last whole group) are GGUF's rows, multiplied by GGUF's kernels.
                let ggml = product(isa, MatmulPath::Auto, &w, &x, n, &single);
                for path in [MatmulPath::Auto, MatmulPath::RowByRow, MatmulPath::MultiRow] {
                    let out = product(isa, path, &m, &x, n, &single);
                    for c in 0..n {
                        let (groups, tail) =
                            (c * rows..c * rows + rows / 16 * 16, c * rows + rows / 16 * 16..(c + 1) * rows);
                        let what = format!("{ty} {isa:?} {path:?} {rows}x{k} n={n} activation row {c}");
                        assert!(same_bits(&out[groups.clone()], &expected[groups]), "{what}: groups");
                        assert!(same_bits(&out[tail.clone()], &ggml[tail]), "{what}: tail");
                    }
                }
            }
        }
    }
}

fn out_of(isa: Isa, m: &QuantMatrix, x: &[f32], n: usize, pool: &ThreadPool) -> Vec<f32> {
    product(isa, MatmulPath::Auto, m, x, n, pool)
}

#[test]
fn the_gemm_reads_interleaved_rows_as_it_reads_gguf_rows() {
    // The GEMM unpacks a chunk of interleaved groups straight into its panel, and a chunk that also holds rows in
    // GGUF's layout (rows 32..50 of 50) row by row, putting each interleaved row back first: the same bits as on
    // GGUF rows either way.
    let single = pool(1);
    let mut rng = Rng(13);
    for (ty, (rows, k)) in
        TYPES.into_iter().flat_map(|ty| [(33, 160), (80, 544), (40, 5120), (50, 160)].map(|s| (ty, of_type(ty, s))))
    {
        let data = quantized(ty, rows, k, &mut rng);
        let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
        let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
        for n in [14, 16, 33] {
            let x = rng.values(n * k, 2.0);
            for isa in isas().into_iter().filter(|&isa| isa == Isa::Avx512) {
                let expected = product(isa, MatmulPath::Gemm, &w, &x, n, &single);
                let out = product(isa, MatmulPath::Gemm, &packed.matrix(), &x, n, &single);
                assert!(same_bits(&out, &expected), "{ty} {isa:?} {rows}x{k} n={n}");
            }
        }
    }
}

#[test]
fn amx_tiles_give_the_vnni_gemm_bits() {
    // The GEMM with its integer products on AMX tiles against the same GEMM on `vpdpbusd`, on GGUF and interleaved
    // rows, ragged row counts (not multiples of the 16 rows of a tile or the 32 of a chunk), activation rows from
    // one to three tiles and a part, one group per row and many, one thread and two (each configures its tiles).
    if !(Isa::Avx512.is_available() && amx_available()) {
        eprintln!("skipped: no AMX tiles for this process (CPU without AMX-INT8, or Linux refused XTILEDATA)");
        return;
    }
    let (single, two) = (pool(1), pool(2));
    let mut rng = Rng(15);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        for (rows, k) in [(33, 32), (45, 160), (80, 544), (40, 5120), (50, 160), (301, 1024)] {
            let data = quantized(ty, rows, k, &mut rng);
            let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
            let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
            for n in [1, 15, 16, 17, 33, 40] {
                let x = rng.values(n * k, 2.0);
                for (layout, m) in [("GGUF", w), ("interleaved", packed.matrix())] {
                    let expected = product(Isa::Avx512, MatmulPath::Gemm, &m, &x, n, &single);
                    for threads in [&single, &two] {
                        let out = product(Isa::Avx512, MatmulPath::Amx, &m, &x, n, threads);
                        let what = format!("{ty} {layout} {rows}x{k} n={n}, {} threads", threads.current_num_threads());
                        assert!(same_bits(&out, &expected), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn threads_do_not_change_interleaved_results() {
    let mut rng = Rng(14);
    let (single, two, three) = (pool(1), pool(2), pool(3));
    for (ty, (rows, k, n)) in TYPES
        .into_iter()
        .flat_map(|ty| [(1201, 2048, 1), (401, 2048, 3), (150, 1024, 20)].map(|(r, k, n)| (ty, (r, k, n))))
    {
        let data = quantized(ty, rows, k, &mut rng);
        let w = QuantMatrix::new(ty, rows, k, &data).unwrap();
        let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
        let x = rng.values(n * k, 2.0);
        let isa = Isa::detect();
        let expected = out_of(isa, &packed.matrix(), &x, n, &single);
        for threads in [&two, &three] {
            let out = out_of(isa, &packed.matrix(), &x, n, threads);
            assert!(same_bits(&out, &expected), "{ty} {rows}x{k} n={n} on {} threads", threads.current_num_threads());
        }
        let mut plain = vec![0f32; n * rows];
        matmul_with(isa, &w, &x, n, &mut plain, &single).unwrap();
        let near = plain.iter().zip(&expected).all(|(a, b)| (a - b).abs() <= 1e-4 * a.abs().max(1.0));
        assert!(near, "interleaved and GGUF rows give the same products to rounding");
    }
}
