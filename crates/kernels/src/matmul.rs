//! `out = x Wᵀ` for weights borrowed in place (e.g. from a memory-mapped GGUF file), split over a caller-owned
//! rayon pool.

use rayon::ThreadPool;

use crate::dequant::dequantize_row;
use crate::isa::Isa;
use crate::kernels::{self, ActRow, Activations};
pub use crate::matrix::QuantMatrix;
use crate::packed;
use crate::schedule::{min_chunk_rows, run_rows, Schedule, SharedOut, PARALLEL_MIN_BYTES};
use crate::types::{check_len, GgmlType, Result};

/// `out[c][r] = Σ_k W[r][k] · x[c][k]` for `n` activation rows `x` (`n × cols`, row-major) into `out`
/// (`n × rows`, row-major), at the fastest instruction-set level of this CPU ([`Isa::detect`]).
///
/// The activations are first quantized as ggml does for each weight type (q8_0 for q4_0/q8_0, q8_K for
/// q4_K/q6_K); f32/f16/bf16 weights use them as they are, and the other types are dequantized row by row.
///
/// Work is split in chunks of output rows claimed from a shared counter (long chunks first, shrinking towards the
/// end) by the calling thread and `pool`'s threads, as many threads in all as the pool has, so threads that run
/// slower (or are preempted) simply claim fewer. A pool of one thread, or a small product, runs on the calling
/// thread alone. Results do not depend on the number of threads: each output is computed by the same code in the
/// same order whichever thread computes it.
///
/// Nor, until the GEMM takes over (AVX-512, from 10 to 17 activation rows by type), on the number of activation
/// rows: the multi-row kernels that multiply a few rows together give each row's outputs bit for bit as a product
/// of that row alone. (The GEMM sums in another order: its results differ in the last bits.)
pub fn matmul(w: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32], pool: &ThreadPool) -> Result<()> {
    matmul_with(Isa::detect(), w, x, n, out, pool)
}

/// [`matmul`] at a chosen instruction-set level (for tests and measurements); `isa` must be available.
///
/// `VICUNA_KERNELS_MULTI_ROW=0` in the environment (read once) turns the multi-row kernels off: products take the
/// path they took before them, one activation row at a time below 8 rows and the GEMM from 8 (for measuring the
/// difference on a whole model).
pub fn matmul_with(isa: Isa, w: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32], pool: &ThreadPool) -> Result<()> {
    static MULTI_ROW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let multi_row = *MULTI_ROW.get_or_init(|| std::env::var("VICUNA_KERNELS_MULTI_ROW").map_or(true, |v| v != "0"));
    let path = match (multi_row, n < 8) {
        (true, _) => MatmulPath::Auto,
        (false, true) => MatmulPath::RowByRow,
        (false, false) => MatmulPath::Gemm,
    };
    matmul_path(isa, path, w, x, n, out, pool)
}

/// The ways [`matmul_path`] can take through a product. [`matmul`] and [`matmul_with`] use `Auto`; the others are
/// for measuring one against another (crates/kernels/examples/kernel_bench.rs), not for use.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// The fastest measured for the type and the number of activation rows (see [`matmul`]).
    Auto,
    /// The one-row kernel once per activation row, over L2-sized pieces of the weights (what two to seven rows took
    /// before the multi-row kernels).
    RowByRow,
    /// The multi-row kernels, in passes of at most `kernels::MAX_MULTI_ROWS` activation rows (row by row where the
    /// type has none).
    MultiRow,
    /// The AVX-512 GEMM with its integer products on `vpdpbusd` (the multi-row path where the type or the
    /// instruction set has none).
    Gemm,
    /// The AVX-512 GEMM with its integer products on AMX tiles where the type has them and this process may use
    /// them (`Gemm` otherwise): the same bits as `Gemm`.
    Amx,
}

/// [`matmul_with`] taking the given [`MatmulPath`]. Every path computes the same products; all but the GEMM give
/// the same bits.
#[doc(hidden)]
pub fn matmul_path(
    isa: Isa,
    path: MatmulPath,
    w: &QuantMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    check_len("activations", n * w.cols(), x.len())?;
    check_len("output", n * w.rows(), out.len())?;
    assert!(isa.is_available(), "{isa:?} kernels requested on a CPU without them");
    if n == 0 || w.rows() == 0 {
        return Ok(());
    }
    let out = SharedOut::new(out, w.rows());
    match Route::choose(isa, path, w.ty(), n) {
        #[cfg(target_arch = "x86_64")]
        Route::Gemm { amx } => gemm(w, x, n, out, pool, amx),
        Route::RowKernels { multi } => row_kernels(isa, multi, w, x, n, out, pool),
        Route::Dequantized => dequantized(isa, w, x, n, out, pool),
    }
    Ok(())
}

/// The kernels that one product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The AVX-512 GEMM, with AMX tiles for the integer products where `amx`.
    #[cfg(target_arch = "x86_64")]
    Gemm { amx: bool },
    /// The row kernels: with `multi`, the multi-row kernels take the activation rows in passes of at most
    /// `kernels::MAX_MULTI_ROWS`; without, the one-row kernel takes them one at a time.
    RowKernels { multi: bool },
    /// No dedicated kernel: each weight row is dequantized to f32 once and used for every activation row.
    Dequantized,
}

impl Route {
    /// The one place where a product's kernels are chosen: from the weight type's row of the kernel table
    /// ([`kernels::traits`]), the instruction set, the path asked for and the number of activation rows.
    fn choose(isa: Isa, path: MatmulPath, ty: GgmlType, n: usize) -> Route {
        let traits = kernels::traits(ty);
        let gemm = match path {
            MatmulPath::Auto => traits.gemm_min_rows.is_some_and(|min_rows| n >= min_rows),
            MatmulPath::Gemm | MatmulPath::Amx => traits.gemm_min_rows.is_some(),
            MatmulPath::RowByRow | MatmulPath::MultiRow => false,
        };
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && gemm {
            let amx = traits.amx
                && match path {
                    MatmulPath::Auto => crate::tuning::Tuning::get().amx,
                    MatmulPath::Amx => kernels::amx::available(),
                    _ => false,
                };
            return Route::Gemm { amx };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (isa, gemm);
        if !traits.row_kernel {
            return Route::Dequantized;
        }
        Route::RowKernels { multi: n > 1 && path != MatmulPath::RowByRow && traits.multi_row_kernel }
    }
}

/// [`Route::Gemm`]: the activations laid out in tiles once, then chunks of weight rows unpacked and multiplied
/// with all of them.
#[cfg(target_arch = "x86_64")]
fn gemm(w: &QuantMatrix, x: &[f32], n: usize, out: SharedOut, pool: &ThreadPool, amx: bool) {
    use kernels::avx512_gemm::{self, GemmScratch};
    let tiles = avx512_gemm::ActTiles::new(w.ty(), x, n, w.cols(), pool);
    let schedule = Schedule::Fixed(avx512_gemm::CHUNK_ROWS);
    run_rows(pool, w.rows(), schedule, true, |rows, scratch: &mut GemmScratch| {
        // SAFETY: AVX-512 is available (asserted in `matmul_path`), and AMX where `amx` (`Route::choose`); chunks
        // cover disjoint row ranges of `out`.
        unsafe { avx512_gemm::gemm(w, rows, &tiles, n, out, scratch, amx) };
    });
}

/// [`Route::RowKernels`].
fn row_kernels(isa: Isa, multi: bool, w: &QuantMatrix, x: &[f32], n: usize, out: SharedOut, pool: &ThreadPool) {
    let acts = Activations::new(kernels::traits(w.ty()).act, x, n, w.cols(), isa);
    let min_rows = min_chunk_rows(w.row_bytes());
    let parallel = w.data().len().saturating_mul(n) >= PARALLEL_MIN_BYTES;
    // Activation rows taken together: all of them, in passes of at most MAX_MULTI_ROWS, on the multi-row path; one
    // at a time otherwise.
    let passes = if multi { n.div_ceil(kernels::MAX_MULTI_ROWS) } else { n };
    let grouped = packed::grouped_rows(w);
    let pass = |p: usize| (p * n / passes)..((p + 1) * n / passes);
    run_rows(pool, w.rows(), Schedule::Guided { min_rows }, parallel, |rows, _: &mut ()| {
        // A chunk may be larger than L2: with several passes over the activations, take it in L2-sized pieces, each
        // for every pass, so that the weights come from memory once. A single pass takes the chunk whole: the
        // kernels prefetch ahead within the rows they are given, and a piece's last 16 KiB would otherwise go
        // unprefetched.
        let piece_rows = if passes == 1 { rows.len().max(1) } else { min_rows };
        for start in rows.clone().step_by(piece_rows) {
            let piece = start..(start + piece_rows).min(rows.end);
            // Chunks and pieces start on multiples of 16 rows, so a piece is whole interleaved groups (if the
            // matrix has them) and then rows in GGUF's layout.
            let split = piece.end.min(grouped).max(piece.start);
            if split > piece.start {
                let data = w.rows_data(piece.start..split);
                for p in 0..passes {
                    let cs = pass(p);
                    let x: [ActRow; kernels::MAX_MULTI_ROWS] =
                        std::array::from_fn(|i| acts.row((cs.start + i).min(cs.end - 1)));
                    // SAFETY: chunks cover disjoint row ranges; the columns of one pass are distinct.
                    let mut outs: [&mut [f32]; kernels::MAX_MULTI_ROWS] = std::array::from_fn(|i| {
                        if i < cs.len() {
                            unsafe { out.column(cs.start + i, piece.start..split) }
                        } else {
                            &mut [][..]
                        }
                    });
                    let (x, outs) = (&x[..cs.len()], &mut outs[..cs.len()]);
                    kernels::groups(isa, w.layout(), w.ty(), data, w.row_bytes(), x, outs);
                }
            }
            let piece = split..piece.end;
            if piece.is_empty() {
                continue;
            }
            let data = w.rows_data(piece.clone());
            for p in 0..passes {
                let cs = pass(p);
                if cs.len() == 1 {
                    // SAFETY: chunks cover disjoint row ranges, so no two threads write the same outputs.
                    let out = unsafe { out.column(cs.start, piece.clone()) };
                    kernels::rows(isa, w.ty(), data, w.row_bytes(), acts.row(cs.start), out);
                    continue;
                }
                let x: [ActRow; kernels::MAX_MULTI_ROWS] =
                    std::array::from_fn(|i| acts.row((cs.start + i).min(cs.end - 1)));
                // SAFETY: as above; the columns of one pass are distinct.
                let mut outs: [&mut [f32]; kernels::MAX_MULTI_ROWS] = std::array::from_fn(|i| {
                    if i < cs.len() {
                        unsafe { out.column(cs.start + i, piece.clone()) }
                    } else {
                        &mut [][..]
                    }
                });
                kernels::rows_multi(isa, w.ty(), data, w.row_bytes(), &x[..cs.len()], &mut outs[..cs.len()]);
            }
        }
    });
}

/// [`Route::Dequantized`].
fn dequantized(isa: Isa, w: &QuantMatrix, x: &[f32], n: usize, out: SharedOut, pool: &ThreadPool) {
    let acts = Activations::new(kernels::traits(w.ty()).act, x, n, w.cols(), isa);
    let min_rows = min_chunk_rows(w.row_bytes());
    let parallel = w.data().len().saturating_mul(n) >= PARALLEL_MIN_BYTES;
    run_rows(pool, w.rows(), Schedule::Guided { min_rows }, parallel, |rows, row_f32: &mut Vec<f32>| {
        row_f32.resize(w.cols(), 0.0);
        for r in rows {
            dequantize_row(w.ty(), w.rows_data(r..r + 1), row_f32).expect("shapes checked in QuantMatrix::new");
            let bytes = f32_bytes(row_f32);
            for c in 0..n {
                // SAFETY: chunks cover disjoint row ranges, so no two threads write the same outputs.
                let out = unsafe { out.column(c, r..r + 1) };
                kernels::rows(isa, GgmlType::F32, bytes, bytes.len(), acts.row(c), out);
            }
        }
    });
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialized bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}
