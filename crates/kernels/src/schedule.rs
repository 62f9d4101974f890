//! How the output rows of one call are split over the threads of a caller-owned rayon pool, and the per-thread
//! buffers the chunks use. Below the kernels and the matmul entry points, and independent of both: each kind of
//! work brings its own [`Scratch`].

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::LocalKey;

use rayon::ThreadPool;

/// Below this many weight bytes times activation rows, a product runs on the calling thread: waking the pool
/// would cost more than it saves.
pub(crate) const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// The smallest chunk on the row-kernel path, and the piece of a chunk done for all activation rows at once: about
/// 64 KiB of weights (still in L2 when the next activation row comes), in multiples of 16 rows.
pub(crate) fn min_chunk_rows(row_bytes: usize) -> usize {
    ((64 << 10) / row_bytes.max(1)).clamp(1, 1 << 12).next_multiple_of(16)
}

/// Per-thread buffers of one kind of work. Each thread keeps its own between calls (see [`with_scratch`]), so a
/// decode step does not allocate (and page-fault in) fresh ones for every matrix.
pub(crate) trait Scratch: Default + 'static {
    /// This thread's buffers (a `thread_local!` of the module that owns the type).
    fn local() -> &'static LocalKey<RefCell<Self>>;
}

/// Work that needs no buffers of its own.
impl Scratch for () {
    fn local() -> &'static LocalKey<RefCell<()>> {
        thread_local! {
            static NONE: RefCell<()> = const { RefCell::new(()) };
        }
        &NONE
    }
}

/// A row of f32 values (the dequantized path's weight row).
impl Scratch for Vec<f32> {
    fn local() -> &'static LocalKey<RefCell<Vec<f32>>> {
        thread_local! {
            static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        &ROW
    }
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
    /// `out` as `n × rows` (row-major), `rows` outputs per activation row.
    pub(crate) fn new(out: &mut [f32], rows: usize) -> SharedOut {
        SharedOut { ptr: out.as_mut_ptr(), rows }
    }

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
pub(crate) fn run_rows<S: Scratch>(
    pool: &ThreadPool,
    total_rows: usize,
    schedule: Schedule,
    parallel: bool,
    work: impl Fn(Range<usize>, &mut S) + Sync,
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

/// Runs `f` with this thread's scratch buffers of kind `S`.
fn with_scratch<S: Scratch, R>(f: impl FnOnce(&mut S) -> R) -> R {
    // A matmul never calls another from inside its work, so the buffers are never borrowed twice; if that ever
    // changed, the inner call would get fresh buffers rather than fail.
    S::local().with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut S::default()),
    })
}
