//! The f32 GEMM: the scalar level against exact (f64) products, every SIMD level against the scalar one bit for bit,
//! on ragged shapes (partial tiles, several KC slices and NC blocks), strided views (transposes), both the store and
//! the accumulate forms, and multi-threaded runs against single-threaded ones bit for bit.

use vicuna_kernels::{sgemm_with, Isa, MatRef, ThreadPoolBuilder};

struct Rng(u64);

impl Rng {
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

/// A `rows × cols` matrix stored row-major, or column-major (viewed through a transpose) when `transposed`.
fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> MatRef<'_> {
    if transposed {
        MatRef::row_major(data, cols, rows).unwrap().t()
    } else {
        MatRef::row_major(data, rows, cols).unwrap()
    }
}

fn at(data: &[f32], rows: usize, cols: usize, transposed: bool, i: usize, j: usize) -> f64 {
    assert!(i < rows && j < cols);
    (if transposed { data[j * rows + i] } else { data[i * cols + j] }) as f64
}

const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (1, 7, 33),
    (5, 3, 2),
    (13, 17, 19),
    (12, 32, 256),
    (25, 70, 300),
    (150, 40, 520),
    (300, 1100, 64),
    (64, 33, 1000),
];

#[test]
fn scalar_level_matches_exact_products() {
    let mut rng = Rng(1);
    for (m, n, k) in SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = rng.values(m * k);
            let b = rng.values(k * n);
            let start = rng.values(m * n);
            for accumulate in [false, true] {
                let mut c = start.clone();
                sgemm_with(Isa::Scalar, true, view(&a, m, k, ta), view(&b, k, n, tb), &mut c, accumulate).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|p| at(&a, m, k, ta, i, p) * at(&b, k, n, tb, p, j)).sum::<f64>()
                            + if accumulate { start[i * n + j] as f64 } else { 0.0 };
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * (k as f64).sqrt() * 4.0,
                            "{m}x{n}x{k} ta={ta} tb={tb} acc={accumulate} ({i},{j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn simd_levels_equal_the_scalar_level_bit_for_bit() {
    let mut rng = Rng(2);
    for (m, n, k) in SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = rng.values(m * k);
            let b = rng.values(k * n);
            let start = rng.values(m * n);
            for accumulate in [false, true] {
                let mut want = start.clone();
                sgemm_with(Isa::Scalar, true, view(&a, m, k, ta), view(&b, k, n, tb), &mut want, accumulate).unwrap();
                for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                    let mut got = start.clone();
                    sgemm_with(isa, true, view(&a, m, k, ta), view(&b, k, n, tb), &mut got, accumulate).unwrap();
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{isa:?} {m}x{n}x{k} ta={ta} tb={tb} acc={accumulate} differs from scalar");
                }
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = Rng(3);
    let (m, n, k) = (700, 300, 600);
    let a = rng.values(m * k);
    let b = rng.values(k * n);
    let run = |threads: usize| {
        let pool = ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut c = vec![0.0; m * n];
        pool.install(|| sgemm_with(Isa::detect(), true, view(&a, m, k, false), view(&b, k, n, true), &mut c, false))
            .unwrap();
        c
    };
    let one = run(1);
    for threads in [2, 3, 4] {
        assert!(run(threads).iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits()), "{threads} threads differ");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let a = vec![0.0; 6];
    let b = vec![0.0; 6];
    let mut c = vec![0.0; 4];
    let a23 = MatRef::row_major(&a, 2, 3).unwrap();
    let b32 = MatRef::row_major(&b, 3, 2).unwrap();
    assert!(sgemm_with(Isa::Scalar, true, a23, b32, &mut c, false).is_ok());
    assert!(sgemm_with(Isa::Scalar, true, a23, b32.t(), &mut c, false).is_err(), "inner dimensions differ");
    assert!(sgemm_with(Isa::Scalar, true, a23, b32, &mut c[..3], false).is_err(), "C too short");
    assert!(MatRef::row_major(&a, 2, 4).is_err());
    assert!(MatRef::new(&a, 2, 3, 4, 1).is_err(), "strides reach past the data");
}
