//! `out = x Wᵀ` for weights borrowed in place (e.g. from a memory-mapped GGUF file), split over a caller-owned
//! rayon pool.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::ThreadPool;

use crate::dequant::dequantize_row;
use crate::isa::Isa;
use crate::kernels::{self, ActKind, ActRow, Activations};
use crate::types::{check_len, row_size, Error, GgmlType, Result};

/// A `rows × cols` weight matrix of type `ty`, stored row after row in `data` exactly as in a GGUF tensor
/// (`rows * row_size(ty, cols)` bytes). Borrowed, never copied.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
}

impl<'a> QuantMatrix<'a> {
    /// Checks that `cols` is a whole number of blocks and that `data` holds exactly `rows` rows.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<QuantMatrix<'a>> {
        let row_bytes = row_size(ty, cols)?;
        check_len("weight data", rows * row_bytes, data.len())?;
        if ty == GgmlType::Q8_K {
            // Only activations are ever q8_K; ggml has no q8_K weights either.
            return Err(Error::Unsupported { op: "a weight matrix", ty });
        }
        Ok(QuantMatrix { ty, rows, cols, row_bytes, data })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes per row, `row_size(ty, cols)`.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    /// The bytes of rows `rows`.
    pub fn rows_data(&self, rows: Range<usize>) -> &'a [u8] {
        &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes]
    }
}

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
    /// The AVX-512 GEMM (the multi-row path where the type or the instruction set has none).
    Gemm,
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
    check_len("activations", n * w.cols, x.len())?;
    check_len("output", n * w.rows, out.len())?;
    assert!(isa.is_available(), "{isa:?} kernels requested on a CPU without them");
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let shared_out = SharedOut { ptr: out.as_mut_ptr(), rows: w.rows };

    #[cfg(target_arch = "x86_64")]
    {
        let gemm = match path {
            MatmulPath::Auto => kernels::avx512_gemm::use_gemm(w.ty, n),
            MatmulPath::Gemm => kernels::avx512_gemm::has_gemm(w.ty),
            MatmulPath::RowByRow | MatmulPath::MultiRow => false,
        };
        if isa == Isa::Avx512 && gemm {
            let tiles = kernels::avx512_gemm::ActTiles::new(w.ty, x, n, w.cols, pool);
            let schedule = Schedule::Fixed(kernels::avx512_gemm::CHUNK_ROWS);
            run_rows(pool, w.rows, schedule, true, |rows, scratch: &mut Scratch| {
                // SAFETY: AVX-512 is available (asserted above); chunks cover disjoint row ranges of `out`.
                unsafe { kernels::avx512_gemm::gemm(w, rows, &tiles, n, shared_out, &mut scratch.gemm) };
            });
            return Ok(());
        }
    }

    let acts = Activations::new(ActKind::for_weights(w.ty), x, n, w.cols, isa);
    let min_rows = min_chunk_rows(w.row_bytes);
    let parallel = w.data.len().saturating_mul(n) >= PARALLEL_MIN_BYTES;
    let multi = n > 1 && path != MatmulPath::RowByRow && kernels::has_multi_row_kernel(w.ty);
    // Activation rows taken together: all of them, in passes of at most MAX_MULTI_ROWS, on the multi-row path; one
    // at a time otherwise.
    let passes = if multi { n.div_ceil(kernels::MAX_MULTI_ROWS) } else { n };
    let pass = |p: usize| (p * n / passes)..((p + 1) * n / passes);
    run_rows(pool, w.rows, Schedule::Guided { min_rows }, parallel, |rows, scratch: &mut Scratch| {
        if kernels::has_row_kernel(w.ty) {
            // A chunk may be larger than L2: with several passes over the activations, take it in L2-sized pieces,
            // each for every pass, so that the weights come from memory once. A single pass takes the chunk whole:
            // the kernels prefetch ahead within the rows they are given, and a piece's last 32 KiB would otherwise
            // go unprefetched.
            let piece_rows = if passes == 1 { rows.len().max(1) } else { min_rows };
            for start in rows.clone().step_by(piece_rows) {
                let piece = start..(start + piece_rows).min(rows.end);
                let data = w.rows_data(piece.clone());
                for p in 0..passes {
                    let cs = pass(p);
                    if cs.len() == 1 {
                        // SAFETY: chunks cover disjoint row ranges, so no two threads write the same outputs.
                        let out = unsafe { shared_out.column(cs.start, piece.clone()) };
                        kernels::rows(isa, w.ty, data, w.row_bytes, acts.row(cs.start), out);
                        continue;
                    }
                    let x: [ActRow; kernels::MAX_MULTI_ROWS] =
                        std::array::from_fn(|i| acts.row((cs.start + i).min(cs.end - 1)));
                    // SAFETY: as above; the columns of one pass are distinct.
                    let mut outs: [&mut [f32]; kernels::MAX_MULTI_ROWS] = std::array::from_fn(|i| {
                        if i < cs.len() {
                            unsafe { shared_out.column(cs.start + i, piece.clone()) }
                        } else {
                            &mut [][..]
                        }
                    });
                    kernels::rows_multi(isa, w.ty, data, w.row_bytes, &x[..cs.len()], &mut outs[..cs.len()]);
                }
            }
        } else {
            // No dedicated kernel: each row is dequantized once and used for every activation row.
            let row_f32 = &mut scratch.row_f32;
            row_f32.resize(w.cols, 0.0);
            for r in rows {
                dequantize_row(w.ty, w.rows_data(r..r + 1), row_f32).expect("shapes checked in QuantMatrix::new");
                let bytes = f32_bytes(row_f32);
                for c in 0..n {
                    // SAFETY: as above.
                    let out = unsafe { shared_out.column(c, r..r + 1) };
                    kernels::rows(isa, GgmlType::F32, bytes, bytes.len(), acts.row(c), out);
                }
            }
        }
    });
    Ok(())
}

/// Below this many weight bytes times activation rows, a product runs on the calling thread: waking the pool
/// would cost more than it saves.
const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// The smallest chunk on the row-kernel path, and the piece of a chunk done for all activation rows at once: about
/// 64 KiB of weights (still in L2 when the next activation row comes), in multiples of 16 rows.
fn min_chunk_rows(row_bytes: usize) -> usize {
    ((64 << 10) / row_bytes.max(1)).clamp(1, 1 << 12).next_multiple_of(16)
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialized bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Per-thread buffers. Each thread keeps its own between calls (see [`with_scratch`]), so a decode step does not
/// allocate (and page-fault in) fresh ones for every matrix.
#[derive(Default)]
pub(crate) struct Scratch {
    row_f32: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    gemm: kernels::avx512_gemm::GemmScratch,
}

/// The output matrix, shared by the threads of one call; each writes only the rows of the chunks it took.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    rows: usize,
}

// SAFETY: `SharedOut` is only handed to the chunks of one call, which write disjoint parts of the output.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The outputs of activation row `c` for weight rows `rows`.
    ///
    /// # Safety
    /// No other live slice may overlap it: callers hand out each (column, row range) to one chunk only.
    pub(crate) unsafe fn column<'o>(self, c: usize, rows: Range<usize>) -> &'o mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(c * self.rows + rows.start), rows.len())
    }
}

/// How the output rows of a call are cut into chunks for the threads.
#[derive(Clone, Copy)]
pub(crate) enum Schedule {
    /// Chunks of this many rows (the GEMM path, whose chunks are its unpacking unit).
    Fixed(usize),
    /// "Guided": each chunk is the remaining rows over twice the thread count, but at least `min_rows` (and a
    /// multiple of 16). Decoding streams weights from memory, and a long run of rows per chunk keeps the hardware
    /// prefetcher on one stream; the chunks shrink towards the end so that the threads finish together.
    Guided { min_rows: usize },
}

/// Runs `work(rows, scratch)` over chunks covering `0..total_rows`, on the calling thread and, when `parallel`, on
/// `pool`'s threads (as many threads in all as the pool has).
pub(crate) fn run_rows(
    pool: &ThreadPool,
    total_rows: usize,
    schedule: Schedule,
    parallel: bool,
    work: impl Fn(Range<usize>, &mut Scratch) + Sync,
) {
    let threads = if parallel { pool.current_num_threads() } else { 1 };
    let chunk_len = |start: usize| -> usize {
        let remaining = total_rows - start;
        let len = match schedule {
            Schedule::Fixed(rows) => rows,
            Schedule::Guided { min_rows } => (remaining / (2 * threads)).next_multiple_of(16).max(min_rows),
        };
        len.min(remaining)
    };
    if threads <= 1 || total_rows <= chunk_len(0) {
        with_scratch(|scratch| {
            let mut start = 0;
            while start < total_rows {
                let len = chunk_len(start);
                work(start..start + len, scratch);
                start += len;
            }
        });
        return;
    }
    let next = AtomicUsize::new(0);
    let take_chunks = || {
        with_scratch(|scratch| {
            let mut start = next.load(Ordering::Relaxed);
            while start < total_rows {
                let len = chunk_len(start);
                match next.compare_exchange_weak(start, start + len, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        work(start..start + len, scratch);
                        start = next.load(Ordering::Relaxed);
                    }
                    Err(current) => start = current,
                }
            }
        })
    };
    // The calling thread takes chunks too, beside `threads - 1` jobs on the pool: it would otherwise sleep while
    // the pool works and be woken at the end, two thread switches per call on top of the workers' wake-ups, and a
    // decode step makes some 280 calls. (Called from a worker of `pool`, the jobs go to its own queue and the other
    // workers steal them; a job that starts after the rows are gone returns at once.)
    pool.in_place_scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| take_chunks());
        }
        take_chunks();
    });
}

/// Runs `f` with this thread's scratch buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }
    // A matmul never calls another from inside its work, so the buffers are never borrowed twice; if that ever
    // changed, the inner call would get fresh buffers rather than fail.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}
