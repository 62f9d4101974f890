//! Dense f32 matrix products for training: `C = A·B` or `C += A·B`, with `A` and `B` strided views (a transpose is
//! a view, never a copy), `C` row-major.
//!
//! The shape is BLIS's: each `NC`-wide block of `B` is packed, for every `KC`-deep slice of the shared dimension,
//! into strips of `NR` columns (the threads share that work); the rows of `A` are cut into blocks that the threads
//! take, and each block walks the slices: its rows of the slice packed into strips of `MR` rows, then a
//! register-blocked micro-kernel multiplies one `A` strip by one `B` strip into an `MR × NR` tile. AVX-512 uses
//! 12 × 32 tiles (24 accumulators), AVX2 6 × 16, the scalar reference 4 × 4. Packing that transposes (row-major
//! `A`, a transposed `B`) goes 16 × 16 at a time through shuffles where AVX-512 is there.
//!
//! Every level computes each element the same way: one fused multiply-add per `k`, in order, from zero, for each
//! `KC` slice, then the slice's sum is added to `C` (or stored into it for the first slice of a fresh product). So
//! the levels agree bit for bit with each other, and results do not depend on the number of threads.
//!
//! Threads: the rows of `C` are split over the current rayon pool (the global one, or the one whose `install` the
//! call runs in).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::isa::Isa;
use crate::types::{Error, Result};

/// The depth of one packed slice of the shared dimension.
const KC: usize = 128;
/// The widest block of `B` packed at once (`KC × NC` floats: 1 MiB).
const NC: usize = 1024;
/// The most rows of `A` one thread packs and multiplies at a time (`MC × KC` floats stay in L2).
const MC_MAX: usize = 144;

/// A read-only strided f32 matrix: element `(i, j)` is `data[i · row_stride + j · col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data` as `rows × cols` with the given strides; every element must lie inside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<Self> {
        let needed = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * row_stride + (cols - 1) * col_stride + 1 };
        if data.len() < needed {
            return Err(Error::Length { what: "strided matrix data", expected: needed, actual: data.len() });
        }
        Ok(MatRef { data, rows, cols, row_stride, col_stride })
    }

    /// `data` as a row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Length { what: "row-major matrix data", expected: rows * cols, actual: data.len() });
        }
        Ok(MatRef { data, rows, cols, row_stride: cols, col_stride: 1 })
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// `C = A·B`, or `C += A·B` when `accumulate`: `a` is `m × k`, `b` is `k × n`, `c` is row-major `m × n`. Large
/// products are split over the current rayon pool.
pub fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) -> Result<()> {
    sgemm_with(Isa::detect(), true, a, b, c, accumulate)
}

/// [`sgemm`] on the calling thread only (for callers that are themselves one task of a parallel loop).
pub fn sgemm_serial(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) -> Result<()> {
    sgemm_with(Isa::detect(), false, a, b, c, accumulate)
}

/// [`sgemm`] at an explicit instruction-set level (tests, measurements), in parallel or not; a level the CPU lacks
/// falls back to the best one it has below it.
pub fn sgemm_with(isa: Isa, parallel: bool, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) -> Result<()> {
    if a.cols != b.rows {
        return Err(Error::Length { what: "B's rows (A's columns)", expected: a.cols, actual: b.rows });
    }
    if c.len() != a.rows * b.cols {
        return Err(Error::Length { what: "C", expected: a.rows * b.cols, actual: c.len() });
    }
    if c.is_empty() {
        return Ok(());
    }
    if a.cols == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let isa = if isa.is_available() { isa } else { Isa::detect() };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => product::<12, 32>(parallel, a, b, c, accumulate, avx512_tile, Some(avx512_transpose)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => product::<6, 16>(parallel, a, b, c, accumulate, avx2_tile, None),
        _ => product::<4, 4>(parallel, a, b, c, accumulate, scalar_tile::<4, 4>, None),
    }
    Ok(())
}

/// A micro-kernel: the `MR × NR` tile `acc = Σ_k a[k][..MR] ⊗ b[k][..NR]` over `kc` packed steps, stored into
/// `c` (row stride `ldc`) or added to it.
///
/// # Safety
/// `a` holds `kc · MR` floats, `b` `kc · NR`, and `c` an `MR × NR` tile at row stride `ldc`; the CPU has the
/// kernel's instruction set.
type Tile = unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool);

/// A 16 × 16 transposing copy for the packing: the 16 runs of 16 floats at `src + i · src_stride` (`i < rows`; the
/// rest read as zeros) become the runs at `dst + j · dst_stride` (`j < 16`), of which the first `cols` floats are
/// written: run `j` holds element `j` of every source run.
///
/// # Safety
/// Every source run and destination prefix lies in memory the caller may read / write; the CPU has the function's
/// instruction set.
type Transpose =
    unsafe fn(src: *const f32, src_stride: usize, rows: usize, dst: *mut f32, dst_stride: usize, cols: usize);

/// The output pointer, shared by the threads; each writes only the rows of its own blocks.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);
// SAFETY: the blocks of one call write disjoint rows of `C`.
unsafe impl Send for SharedC {}
unsafe impl Sync for SharedC {}

impl SharedC {
    /// The element `offset` floats in (a method, so that closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `offset` is inside `C`.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

thread_local! {
    /// This thread's packing buffers, kept between calls (no page faults per product). A call takes them out and
    /// puts them back, so no borrow is held while the thread helps with other rayon work.
    static PACKED: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

fn with_buffer<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buffer = PACKED.with_borrow_mut(|free| free.pop()).unwrap_or_default();
    let result = f(&mut buffer);
    PACKED.with_borrow_mut(|free| free.push(buffer));
    result
}

fn product<const MR: usize, const NR: usize>(
    parallel: bool,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    accumulate: bool,
    tile: Tile,
    transpose: Option<Transpose>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Row blocks: enough for every thread, each at most MC_MAX rows, in whole strips.
    let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
    let blocks = m.div_ceil(MC_MAX).next_multiple_of(threads).min(m.div_ceil(MR));
    let mc = m.div_ceil(blocks).next_multiple_of(MR);
    let out = SharedC(c.as_mut_ptr());
    with_buffer(|packed_b| {
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            // One parallel pass packs every KC slice of this B block, another multiplies: each row block walks
            // the slices itself, so the threads meet twice per NC block, not twice per slice.
            let parallel = blocks > 1 && m * nc * k >= 1 << 18;
            pack_b::<NR>(b, jc, nc, packed_b, transpose, parallel);
            let packed_b = &packed_b[..];
            let strips = nc.div_ceil(NR);
            let run = |ic: usize| {
                with_buffer(|packed_a| {
                    let rows = mc.min(m - ic);
                    for pc in (0..k).step_by(KC) {
                        let kc = KC.min(k - pc);
                        pack_a::<MR>(a, ic, rows, pc, kc, packed_a, transpose);
                        let slice = &packed_b[pc * strips * NR..][..kc * strips * NR];
                        // SAFETY: this block writes rows ic..ic + rows of C only; the packed buffers hold whole
                        // strips of kc steps.
                        unsafe {
                            block::<MR, NR>(
                                kc,
                                packed_a,
                                slice,
                                rows,
                                nc,
                                out.at(ic * n + jc),
                                n,
                                accumulate || pc > 0,
                                tile,
                            )
                        };
                    }
                })
            };
            if parallel {
                (0..m).step_by(mc).collect::<Vec<_>>().into_par_iter().for_each(run);
            } else {
                (0..m).step_by(mc).for_each(run);
            }
        }
    });
}

/// One packed `A` block (`rows` rows) times the packed `B` block (`nc` columns) into `c` (row stride `ldc`).
///
/// # Safety
/// `c` points at a `rows × nc` region of row stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn block<const MR: usize, const NR: usize>(
    kc: usize,
    packed_a: &[f32],
    packed_b: &[f32],
    rows: usize,
    nc: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    tile: Tile,
) {
    let mut edge = [[0f32; NR]; MR];
    for jr in (0..nc).step_by(NR) {
        let b = packed_b[jr * kc..].as_ptr();
        let cols = NR.min(nc - jr);
        for ir in (0..rows).step_by(MR) {
            let a = packed_a[ir * kc..].as_ptr();
            let tile_rows = MR.min(rows - ir);
            let c = c.add(ir * ldc + jr);
            if tile_rows == MR && cols == NR {
                tile(kc, a, b, c, ldc, accumulate);
            } else {
                // A partial tile: computed whole into `edge`, then its valid part stored or added.
                tile(kc, a, b, edge.as_mut_ptr().cast(), NR, false);
                for (i, row) in edge.iter().enumerate().take(tile_rows) {
                    for (j, &v) in row.iter().enumerate().take(cols) {
                        let p = c.add(i * ldc + j);
                        *p = if accumulate { *p + v } else { v };
                    }
                }
            }
        }
    }
}

/// Rows `ic..ic + rows`, columns `pc..pc + kc` of `a`, as strips of `MR` rows: `[strip][k][MR]`, zero-padded.
fn pack_a<const MR: usize>(
    a: MatRef,
    ic: usize,
    rows: usize,
    pc: usize,
    kc: usize,
    out: &mut Vec<f32>,
    transpose: Option<Transpose>,
) {
    let strips = rows.div_ceil(MR);
    out.clear();
    out.resize(strips * kc * MR, 0.0);
    for s in 0..strips {
        let strip = &mut out[s * kc * MR..(s + 1) * kc * MR];
        let strip_rows = MR.min(rows - s * MR);
        if a.row_stride == 1 && a.col_stride != 1 {
            // A transposed view: each k step's MR rows are contiguous in memory.
            for p in 0..kc {
                let src = &a.data[(pc + p) * a.col_stride + ic + s * MR..][..strip_rows];
                strip[p * MR..p * MR + strip_rows].copy_from_slice(src);
            }
            continue;
        }
        // Row-major rows: 16 steps of k at a time through the transposing copy, the rest one by one.
        let mut done = 0;
        if let (Some(transpose), 1, true) = (transpose, a.col_stride, MR <= 16) {
            let first = &a.data[(ic + s * MR) * a.row_stride + pc..];
            done = kc / 16 * 16;
            for p in (0..done).step_by(16) {
                // SAFETY: the strip's rows hold kc floats from pc (the view was checked), p + 16 <= kc, and
                // strip[p * MR..] has room for 16 runs of MR floats.
                unsafe {
                    transpose(first[p..].as_ptr(), a.row_stride, strip_rows, strip[p * MR..].as_mut_ptr(), MR, MR)
                };
            }
        }
        if done == kc {
            continue;
        }
        for i in 0..strip_rows {
            let row = ic + s * MR + i;
            if a.col_stride == 1 {
                let src = &a.data[row * a.row_stride + pc..][..kc];
                for (p, &v) in src.iter().enumerate().skip(done) {
                    strip[p * MR + i] = v;
                }
            } else {
                for p in 0..kc {
                    strip[p * MR + i] = a.at(row, pc + p);
                }
            }
        }
    }
}

/// Columns `jc..jc + nc` of `b`, every row, as one packed block per `KC` slice of rows, one after the other: the
/// slice at row `pc` starts at `pc · strips · NR` and holds strips of `NR` columns, `[strip][k][NR]`, zero-padded.
fn pack_b<const NR: usize>(
    b: MatRef,
    jc: usize,
    nc: usize,
    out: &mut Vec<f32>,
    transpose: Option<Transpose>,
    parallel: bool,
) {
    let (k, strips) = (b.rows, nc.div_ceil(NR));
    out.clear();
    out.resize(strips * k * NR, 0.0);
    let mut work = Vec::with_capacity(k.div_ceil(KC) * strips);
    let mut rest = &mut out[..];
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        for s in 0..strips {
            let (strip, tail) = rest.split_at_mut(kc * NR);
            work.push((pc, kc, s, strip));
            rest = tail;
        }
    }
    let pack = |(pc, kc, s, strip): (usize, usize, usize, &mut [f32])| {
        pack_b_strip::<NR>(b, pc, kc, jc + s * NR, NR.min(nc - s * NR), strip, transpose)
    };
    if parallel {
        work.into_par_iter().for_each(pack);
    } else {
        work.into_iter().for_each(pack);
    }
}

/// Columns `col0..col0 + cols` (at most `NR`) of rows `pc..pc + kc` of `b` into one zeroed strip: `[k][NR]`.
fn pack_b_strip<const NR: usize>(
    b: MatRef,
    pc: usize,
    kc: usize,
    col0: usize,
    cols: usize,
    strip: &mut [f32],
    transpose: Option<Transpose>,
) {
    if b.col_stride == 1 {
        for p in 0..kc {
            let src = &b.data[(pc + p) * b.row_stride + col0..][..cols];
            strip[p * NR..p * NR + cols].copy_from_slice(src);
        }
    } else {
        // Columns that are runs of memory (a transposed view): 16 columns × 16 steps of k at a time through the
        // transposing copy, the rest one by one.
        let mut done = 0;
        if let (Some(transpose), 1) = (transpose, b.row_stride) {
            done = kc / 16 * 16;
            for j in (0..cols).step_by(16) {
                let first = &b.data[(col0 + j) * b.col_stride + pc..];
                for p in (0..done).step_by(16) {
                    // SAFETY: the view's columns hold kc floats from pc, p + 16 <= kc, and strip[p * NR + j..]
                    // has room for 16 runs of NR floats from column j (NR is a multiple of 16 here).
                    unsafe {
                        let dst = strip[p * NR + j..].as_mut_ptr();
                        transpose(first[p..].as_ptr(), b.col_stride, 16.min(cols - j), dst, NR, 16.min(NR - j));
                    }
                }
            }
        }
        if done == kc {
            return;
        }
        for j in 0..cols {
            let col = col0 + j;
            if b.row_stride == 1 {
                // A transposed view (the weight of `x · wᵀ`): each column is a run of memory, read while a
                // later one is fetched (without the prefetch this loop waits on memory for every line).
                prefetch(&b.data[(col + PREFETCH_AHEAD).min(b.cols - 1) * b.col_stride + pc..][..kc]);
                let src = &b.data[col * b.col_stride + pc..][..kc];
                for (p, &v) in src.iter().enumerate().skip(done) {
                    strip[p * NR + j] = v;
                }
            } else {
                for p in 0..kc {
                    strip[p * NR + j] = b.at(pc + p, col);
                }
            }
        }
    }
}

/// How many columns ahead the transposing pack fetches.
const PREFETCH_AHEAD: usize = 4;

/// Ask for the cache lines of `data` (a hint; nothing is read).
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: prefetching is a hint with no effect on memory; the address is inside `data`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// The reference micro-kernel: what the others compute, in plain Rust.
///
/// # Safety
/// As [`Tile`].
unsafe fn scalar_tile<const MR: usize, const NR: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        for (i, row) in acc.iter_mut().enumerate() {
            let av = *a.add(p * MR + i);
            for (j, v) in row.iter_mut().enumerate() {
                *v = av.mul_add(*b.add(p * NR + j), *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let p = c.add(i * ldc + j);
            *p = if accumulate { *p + v } else { v };
        }
    }
}

/// 12 × 32 tiles: two 16-float `B` vectors per step, each `A` value broadcast from memory into 2 FMAs.
///
/// # Safety
/// As [`Tile`], on a CPU with AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    const MR: usize = 12;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * 32));
        let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(p * MR + i));
            row[0] = _mm512_fmadd_ps(av, b0, row[0]);
            row[1] = _mm512_fmadd_ps(av, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            let p = c.add(i * ldc + h * 16);
            let v = if accumulate { _mm512_add_ps(_mm512_loadu_ps(p), v) } else { v };
            _mm512_storeu_ps(p, v);
        }
    }
}

/// [`Transpose`] with AVX-512: 16 loads, four rounds of 16 shuffles (pairs of floats, pairs of pairs, then
/// 128-bit lanes twice), 16 stores.
///
/// # Safety
/// As [`Transpose`], on a CPU with AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_transpose(
    src: *const f32,
    src_stride: usize,
    rows: usize,
    dst: *mut f32,
    dst_stride: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate().take(rows) {
        *v = _mm512_loadu_ps(src.add(i * src_stride));
    }
    // Rows 2i and 2i + 1 interleaved: lane L of a[2i] holds (2i, 4L), (2i+1, 4L), (2i, 4L+1), (2i+1, 4L+1); a[2i + 1]
    // the same for columns 4L+2 and 4L+3.
    let mut a = [_mm512_setzero_pd(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_castps_pd(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]));
        a[2 * i + 1] = _mm512_castps_pd(_mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
    }
    // Lane L of b[4g + q] holds column 4L + q of rows 4g..4g + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        b[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a[4 * g], a[4 * g + 2]));
        b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a[4 * g], a[4 * g + 2]));
        b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a[4 * g + 1], a[4 * g + 3]));
        b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a[4 * g + 1], a[4 * g + 3]));
    }
    // Column 4L + q gathers lane L of b[q], b[4 + q], b[8 + q], b[12 + q]: a 4 × 4 transpose of 128-bit lanes.
    let mask: __mmask16 = if cols >= 16 { 0xffff } else { (1 << cols) - 1 };
    for q in 0..4 {
        let c0 = _mm512_shuffle_f32x4::<0x44>(b[q], b[4 + q]);
        let c1 = _mm512_shuffle_f32x4::<0xee>(b[q], b[4 + q]);
        let c2 = _mm512_shuffle_f32x4::<0x44>(b[8 + q], b[12 + q]);
        let c3 = _mm512_shuffle_f32x4::<0xee>(b[8 + q], b[12 + q]);
        let columns = [
            (q, _mm512_shuffle_f32x4::<0x88>(c0, c2)),
            (4 + q, _mm512_shuffle_f32x4::<0xdd>(c0, c2)),
            (8 + q, _mm512_shuffle_f32x4::<0x88>(c1, c3)),
            (12 + q, _mm512_shuffle_f32x4::<0xdd>(c1, c3)),
        ];
        for (j, v) in columns {
            _mm512_mask_storeu_ps(dst.add(j * dst_stride), mask, v);
        }
    }
}

/// 6 × 16 tiles: two 8-float `B` vectors per step (12 accumulators).
///
/// # Safety
/// As [`Tile`], on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * 16));
        let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_ps(*a.add(p * MR + i));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            let p = c.add(i * ldc + h * 8);
            let v = if accumulate { _mm256_add_ps(_mm256_loadu_ps(p), v) } else { v };
            _mm256_storeu_ps(p, v);
        }
    }
}
