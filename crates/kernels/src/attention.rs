//! Causal self-attention of new query rows over a key/value cache (f16 or f32), flash-attention style.
//!
//! For each query, `out = Σ_j softmax_j(q·k_j / √d) v_j` over the keys it may see (causal: a query sees every
//! cached position up to and including its own). The full positions × positions score matrix is never built:
//! keys are taken in blocks of [`KEY_BLOCK`], and each query keeps a running maximum, a running sum of
//! exponentials and an accumulator that are rescaled whenever the maximum grows ("online softmax").
//!
//! Grouped-query attention: query head `h` reads key/value head `h / (n_heads / n_kv_heads)` (transformers'
//! `repeat_kv` order). One work item is (sequence, key/value head, block of [`QUERY_BLOCK`] query rows): it widens
//! each key/value block to f32 once and uses it for every query row of the block and every query head of the
//! group. Items are spread over the caller's rayon pool.
//!
//! Each item is one generic routine over a few vector primitives ([`Lanes`]: scores q·K, weighted sum of V, scale,
//! f16 → f32, exp);
//! the primitives exist as portable scalar code (the reference) and as AVX2 and AVX-512 code, chosen at run time
//! with [`Isa`]. Results never depend on the number of threads.

use half::f16;
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::isa::Isa;
use crate::types::{check_len, Error, Result};

/// Keys widened to f32 at a time (per item): 64 keys of head_dim 128 are 32 KiB with their values, in L1/L2.
pub const KEY_BLOCK: usize = 64;
/// Query rows per work item: enough to reuse each widened key block, few enough to spread a prompt over threads.
pub const QUERY_BLOCK: usize = 16;

/// Head geometry: `n_heads` query heads, `n_kv_heads` key/value heads (a divisor of `n_heads`), each `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadLayout {
    /// Floats in one query (or output) row: all query heads side by side.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Values in one cached position: all key (or value) heads side by side.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// One sequence of a batched attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSeq<'a> {
    /// The new query rows, already rotated: `rows × q_dim`.
    pub queries: &'a [f32],
    /// Keys of every position of the sequence, the new rows' last (`positions × kv_dim` in all). The new rows are
    /// the last `rows` positions, so query row `r` sees positions `0 ..= positions - rows + r`.
    pub keys: KvView<'a>,
    /// Values, laid out as `keys`.
    pub values: KvView<'a>,
}

/// A sequence's keys (or values): one buffer of `positions × kv_dim` values, or the pages of a paged KV cache.
#[derive(Clone, Copy, Debug)]
pub enum KvView<'a> {
    Contiguous(KvSlice<'a>),
    /// `positions` positions in pages of `page_positions` each: page `i` holds positions `i · page_positions ..`
    /// as `page_positions × kv_dim` values (the last page may hold fewer positions than it has room for).
    Paged {
        pages: &'a [KvSlice<'a>],
        page_positions: usize,
        positions: usize,
    },
}

impl<'a> From<KvSlice<'a>> for KvView<'a> {
    fn from(slice: KvSlice<'a>) -> Self {
        KvView::Contiguous(slice)
    }
}

impl<'a> KvView<'a> {
    /// Positions held, for `kv_dim` values per position.
    pub fn positions(&self, kv_dim: usize) -> usize {
        match self {
            KvView::Contiguous(s) => s.len() / kv_dim,
            KvView::Paged { positions, .. } => *positions,
        }
    }

    /// The positions from `pos` on that lie in one piece of memory (to the end of `pos`'s page, at most to `end`):
    /// the values from `pos`'s first on, and how many positions.
    #[inline(always)]
    fn run(&self, pos: usize, end: usize, kv_dim: usize) -> (KvSlice<'a>, usize) {
        let (slice, row, rows) = match *self {
            KvView::Contiguous(s) => (s, pos, end - pos),
            KvView::Paged { pages, page_positions, .. } => {
                let row = pos % page_positions;
                (pages[pos / page_positions], row, (page_positions - row).min(end - pos))
            }
        };
        let from = row * kv_dim;
        match slice {
            KvSlice::F16(s) => (KvSlice::F16(&s[from..]), rows),
            KvSlice::F32(s) => (KvSlice::F32(&s[from..]), rows),
        }
    }

    /// Checks that the view holds whole positions of `kv_dim` values, every page all it claims; returns how many.
    fn check(&self, what: &'static str, kv_dim: usize) -> Result<usize> {
        match *self {
            KvView::Contiguous(s) => {
                let positions = s.len() / kv_dim;
                check_len(what, positions * kv_dim, s.len())?;
                Ok(positions)
            }
            KvView::Paged { pages, page_positions, positions } => {
                if page_positions == 0 {
                    return Err(Error::Length { what: "positions per KV page (positive)", expected: 1, actual: 0 });
                }
                let needed = positions.div_ceil(page_positions);
                check_len(what, needed, pages.len().min(needed))?;
                for (i, page) in pages[..needed].iter().enumerate() {
                    let held = (positions - i * page_positions).min(page_positions);
                    if page.len() < held * kv_dim {
                        return Err(Error::Length { what, expected: held * kv_dim, actual: page.len() });
                    }
                }
                Ok(positions)
            }
        }
    }
}

/// Cached keys or values: f16 (half the memory; what llama.cpp keeps by default) or f32 (exact).
#[derive(Clone, Copy, Debug)]
pub enum KvSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F16(s) => s.len(),
            KvSlice::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rounds `src` to f16 into `dst` (nearest, ties to even: what `half::f16::from_f32` does), with F16C where the
/// CPU has it: writing keys and values into an f16 cache.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> Result<()> {
    check_len("f16 destination", src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Scalar {
        // SAFETY: AVX2 (with F16C) or better is available.
        unsafe { x86::f32_to_f16_f16c(src, dst) };
        return Ok(());
    }
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f16::from_f32(s));
    Ok(())
}

/// Attention of every sequence's new rows; `out` stacks the sequences' output rows in order (`Σ rows × q_dim`), at
/// the fastest instruction-set level of this CPU.
pub fn attention(layout: HeadLayout, seqs: &[AttentionSeq], out: &mut [f32], pool: &ThreadPool) -> Result<()> {
    attention_with(Isa::detect(), layout, seqs, out, pool)
}

/// [`attention`] at a chosen instruction-set level (tests, measurements); `isa` must be available.
pub fn attention_with(
    isa: Isa,
    layout: HeadLayout,
    seqs: &[AttentionSeq],
    out: &mut [f32],
    pool: &ThreadPool,
) -> Result<()> {
    assert!(isa.is_available(), "{isa:?} kernels requested on a CPU without them");
    let items = plan(layout, seqs, out.len())?;
    let out = SharedRows { ptr: out.as_mut_ptr(), row_len: layout.q_dim() };
    let run = |item: &Item| {
        let seq = &seqs[item.seq];
        match isa {
            // SAFETY: the level is available (asserted above); items write disjoint (row, head) parts of `out`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { attend_avx512(layout, seq, item, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { attend_avx2(layout, seq, item, out) },
            // SAFETY: as above.
            _ => unsafe { attend::<Scalar>(layout, seq, item, out) },
        }
    };
    if pool.current_num_threads() <= 1 || items.len() <= 1 {
        items.iter().for_each(run);
    } else {
        pool.install(|| items.par_iter().for_each(run));
    }
    Ok(())
}

/// Checks the shapes and cuts the work into items.
fn plan(layout: HeadLayout, seqs: &[AttentionSeq], out_len: usize) -> Result<Vec<Item>> {
    let HeadLayout { n_heads, n_kv_heads, head_dim } = layout;
    if head_dim == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::Length {
            what: "query heads (a multiple of the key/value heads)",
            expected: n_kv_heads,
            actual: n_heads,
        });
    }
    let (q_dim, kv_dim) = (layout.q_dim(), layout.kv_dim());
    let mut items = Vec::new();
    let mut first_out_row = 0;
    for (index, seq) in seqs.iter().enumerate() {
        let rows = seq.queries.len() / q_dim;
        check_len("attention queries", rows * q_dim, seq.queries.len())?;
        let positions = seq.keys.check("attention keys", kv_dim)?;
        let value_positions = seq.values.check("attention values", kv_dim)?;
        check_len("attention values (one per key)", positions, value_positions)?;
        if positions < rows {
            return Err(Error::Length {
                what: "cached positions (at least the new rows)",
                expected: rows,
                actual: positions,
            });
        }
        for kv_head in 0..n_kv_heads {
            for start in (0..rows).step_by(QUERY_BLOCK) {
                let end = (start + QUERY_BLOCK).min(rows);
                items.push(Item { seq: index, kv_head, rows: start..end, first_out_row });
            }
        }
        first_out_row += rows;
    }
    check_len("attention output", first_out_row * q_dim, out_len)?;
    Ok(items)
}

/// One work item: query rows `rows` of sequence `seq`, for every query head reading key/value head `kv_head`.
#[derive(Clone, Debug)]
struct Item {
    seq: usize,
    kv_head: usize,
    rows: std::ops::Range<usize>,
    /// Where the sequence's row 0 lands in the stacked output.
    first_out_row: usize,
}

/// The output matrix shared by the items of one call; each writes only its own (row, head) pieces.
#[derive(Clone, Copy)]
struct SharedRows {
    ptr: *mut f32,
    row_len: usize,
}

// SAFETY: only handed to the items of one call, which write disjoint pieces.
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// Floats `cols` of output row `row`.
    ///
    /// # Safety
    /// No other live slice may overlap it.
    unsafe fn piece<'o>(self, row: usize, cols: std::ops::Range<usize>) -> &'o mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(row * self.row_len + cols.start), cols.len())
    }
}

/// The vector primitives an item is built from. Every method is `unsafe` because the SIMD versions require their
/// instruction set; all slices of one call have equal lengths.
trait Lanes {
    /// `out[j] = (q · keys[j]) · scale` for the `out.len()` keys of `keys`, key `j` being the `q.len()` values from
    /// `j · stride` on; returns the largest.
    unsafe fn scores<E: KvElem>(q: &[f32], keys: &[E], stride: usize, scale: f32, out: &mut [f32]) -> f32;
    /// `acc += Σ_j weights[j] · values[j]` for the `weights.len()` values of `values`, value `j` being the
    /// `acc.len()` values from `j · stride` on.
    unsafe fn accumulate<E: KvElem>(acc: &mut [f32], weights: &[f32], values: &[E], stride: usize);
    /// `y *= a`
    unsafe fn scale(y: &mut [f32], a: f32);
    /// f16 → f32
    unsafe fn widen(src: &[f16], dst: &mut [f32]);
    /// `x[i] = exp(x[i] - shift)` (every `x[i] ≤ shift`), returning `Σ x[i]` afterwards.
    unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32;
}

/// A value of the KV cache as the kernels read it: f32 as is, f16 widened on the way into registers (exactly, so
/// reading f16 directly gives the same sums as widening it first).
trait KvElem: Copy {
    fn to_f32(self) -> f32;
    /// 16 values from `p`, lanes outside `m` zero.
    ///
    /// # Safety
    /// AVX-512F and F16C must be available; the lanes in `m` must be readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, m: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512;
    /// 8 values from `p`.
    ///
    /// # Safety
    /// AVX and F16C must be available; the 8 values must be readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32, m: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(m, p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16, m: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// Calls `f(pos, run, count)` for the runs of positions `start..end` of `view` that lie in one piece of memory,
/// `run` starting at column `col` of position `pos`.
#[inline(always)]
fn for_each_run<'a>(
    view: &KvView<'a>,
    (start, end): (usize, usize),
    kv_dim: usize,
    col: usize,
    mut f: impl FnMut(usize, KvSlice<'a>, usize),
) {
    let mut pos = start;
    while pos < end {
        let (run, count) = view.run(pos, end, kv_dim);
        let run = match run {
            KvSlice::F16(s) => KvSlice::F16(&s[col..]),
            KvSlice::F32(s) => KvSlice::F32(&s[col..]),
        };
        f(pos, run, count);
        pos += count;
    }
}

/// One query (a decoding step without grouped heads): online softmax over key blocks read straight from the
/// cache's pages, f16 widened in registers. With one query per item no widened tile would be read twice, so
/// writing one would only double the memory traffic.
///
/// # Safety
/// As [`attend`].
#[inline(always)]
unsafe fn attend_one<L: Lanes>(layout: HeadLayout, seq: &AttentionSeq, item: &Item, out: SharedRows) {
    let d = layout.head_dim;
    let (q_dim, kv_dim) = (layout.q_dim(), layout.kv_dim());
    let rows = seq.queries.len() / q_dim;
    let r = item.rows.start;
    let seen = seq.keys.positions(kv_dim) - rows + r + 1;
    let scale = 1.0 / (d as f32).sqrt();
    let cols = item.kv_head * d..(item.kv_head + 1) * d;
    let q = &seq.queries[r * q_dim..][cols.clone()];
    let mut acc = vec![0.0f32; d];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut scores = [0.0f32; KEY_BLOCK];
    for block_start in (0..seen).step_by(KEY_BLOCK) {
        let block = (block_start, (block_start + KEY_BLOCK).min(seen));
        let mut block_max = f32::NEG_INFINITY;
        for_each_run(&seq.keys, block, kv_dim, cols.start, |pos, run, count| {
            let out = &mut scores[pos - block_start..][..count];
            let m = match run {
                KvSlice::F16(keys) => L::scores(q, keys, kv_dim, scale, out),
                KvSlice::F32(keys) => L::scores(q, keys, kv_dim, scale, out),
            };
            block_max = block_max.max(m);
        });
        if block_max > max {
            let correction = (max - block_max).exp();
            L::scale(&mut acc, correction);
            sum *= correction;
            max = block_max;
        }
        let n = block.1 - block_start;
        sum += L::exp_shifted(&mut scores[..n], max);
        for_each_run(&seq.values, block, kv_dim, cols.start, |pos, run, count| {
            let weights = &scores[pos - block_start..][..count];
            match run {
                KvSlice::F16(values) => L::accumulate(&mut acc, weights, values, kv_dim),
                KvSlice::F32(values) => L::accumulate(&mut acc, weights, values, kv_dim),
            }
        });
    }
    let dst = out.piece(item.first_out_row + r, cols);
    dst.copy_from_slice(&acc);
    // The query sees at least its own key, so the sum is positive.
    L::scale(dst, 1.0 / sum);
}

/// One item: online softmax over key blocks for each (query row, query head) of the item.
///
/// # Safety
/// `L`'s instruction set must be available; no other item may write the same output pieces.
#[inline(always)]
unsafe fn attend<L: Lanes>(layout: HeadLayout, seq: &AttentionSeq, item: &Item, out: SharedRows) {
    let d = layout.head_dim;
    let group = layout.n_heads / layout.n_kv_heads;
    if item.rows.len() * group == 1 {
        return attend_one::<L>(layout, seq, item, out);
    }
    let (q_dim, kv_dim) = (layout.q_dim(), layout.kv_dim());
    let rows = seq.queries.len() / q_dim;
    let positions = seq.keys.positions(kv_dim);
    // Row r is position `past + r`: it sees keys `0 .. past + r + 1`.
    let past = positions - rows;
    let scale = 1.0 / (d as f32).sqrt();

    // Running state of every (row, head) query of the item, indexed `(r - rows.start) * group + g`.
    let queries = item.rows.len() * group;
    let mut acc = vec![0.0f32; queries * d];
    let mut max = vec![f32::NEG_INFINITY; queries];
    let mut sum = vec![0.0f32; queries];
    let mut keys = vec![0.0f32; KEY_BLOCK * d];
    let mut values = vec![0.0f32; KEY_BLOCK * d];
    let mut scores = [0.0f32; KEY_BLOCK];

    let head_cols = |head: usize| head * d..(head + 1) * d;
    let kv_cols = head_cols(item.kv_head);
    let seen_by_last_row = past + item.rows.end;
    for block_start in (0..seen_by_last_row).step_by(KEY_BLOCK) {
        let block_end = (block_start + KEY_BLOCK).min(seen_by_last_row);
        // Widen the block's keys and values of this head into the tiles, a run of positions in one page at a time.
        for (src, tile) in [(&seq.keys, &mut keys), (&seq.values, &mut values)] {
            let mut pos = block_start;
            while pos < block_end {
                let (run, rows) = src.run(pos, block_end, kv_dim);
                let tile = &mut tile[(pos - block_start) * d..(pos - block_start + rows) * d];
                let sources = (0..rows).map(|r| r * kv_dim + kv_cols.start);
                match run {
                    KvSlice::F16(run) => {
                        sources.zip(tile.chunks_exact_mut(d)).for_each(|(at, dst)| L::widen(&run[at..at + d], dst))
                    }
                    KvSlice::F32(run) => sources
                        .zip(tile.chunks_exact_mut(d))
                        .for_each(|(at, dst)| dst.copy_from_slice(&run[at..at + d])),
                }
                pos += rows;
            }
        }
        for r in item.rows.clone() {
            let seen = (past + r + 1).min(block_end);
            if seen <= block_start {
                continue;
            }
            let n = seen - block_start;
            for g in 0..group {
                let head = item.kv_head * group + g;
                let q = &seq.queries[r * q_dim..][head_cols(head)];
                let i = (r - item.rows.start) * group + g;
                let block_max = L::scores(q, &keys[..n * d], d, scale, &mut scores[..n]);
                let acc = &mut acc[i * d..(i + 1) * d];
                if block_max > max[i] {
                    // Everything so far was weighed against a smaller maximum: rescale it to the new one.
                    let correction = (max[i] - block_max).exp();
                    L::scale(acc, correction);
                    sum[i] *= correction;
                    max[i] = block_max;
                }
                sum[i] += L::exp_shifted(&mut scores[..n], max[i]);
                L::accumulate(acc, &scores[..n], &values[..n * d], d);
            }
        }
    }
    for r in item.rows.clone() {
        for g in 0..group {
            let head = item.kv_head * group + g;
            let i = (r - item.rows.start) * group + g;
            let dst = out.piece(item.first_out_row + r, head_cols(head));
            dst.copy_from_slice(&acc[i * d..(i + 1) * d]);
            // Every row sees at least its own key, so the sum is positive.
            L::scale(dst, 1.0 / sum[i]);
        }
    }
}

/// The portable reference.
struct Scalar;

impl Lanes for Scalar {
    unsafe fn scores<E: KvElem>(q: &[f32], keys: &[E], stride: usize, scale: f32, out: &mut [f32]) -> f32 {
        out.iter_mut().enumerate().fold(f32::NEG_INFINITY, |max, (j, o)| {
            let k = &keys[j * stride..][..q.len()];
            *o = q.iter().zip(k).map(|(x, y)| x * y.to_f32()).sum::<f32>() * scale;
            max.max(*o)
        })
    }
    unsafe fn accumulate<E: KvElem>(acc: &mut [f32], weights: &[f32], values: &[E], stride: usize) {
        for (j, &w) in weights.iter().enumerate() {
            let v = &values[j * stride..][..acc.len()];
            acc.iter_mut().zip(v).for_each(|(y, x)| *y += w * x.to_f32());
        }
    }
    unsafe fn scale(y: &mut [f32], a: f32) {
        y.iter_mut().for_each(|y| *y *= a);
    }
    unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
    }
    unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        x.iter_mut()
            .map(|v| {
                *v = (*v - shift).exp();
                *v
            })
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn attend_avx512(layout: HeadLayout, seq: &AttentionSeq, item: &Item, out: SharedRows) {
    attend::<x86::Avx512>(layout, seq, item, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn attend_avx2(layout: HeadLayout, seq: &AttentionSeq, item: &Item, out: SharedRows) {
    attend::<x86::Avx2>(layout, seq, item, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The primitives in AVX2 (8 lanes, scalar tails) and AVX-512 (16 lanes, masked tails). `exp` is Cephes'
    //! `expf`: `x = n ln2 + r`, a degree-6 polynomial in `r`, times `2ⁿ` (relative error ~1e-7).

    use std::arch::x86_64::*;

    use half::f16;

    use super::{KvElem, Lanes, Scalar};

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Below this `exp` is under f32's normal range; arguments are clamped there (the result, ~1e-38, counts as 0).
    const EXP_MIN: f32 = -87.3;
    const EXP_POLY: [f32; 6] = [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

    pub(super) struct Avx512;

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [f16]) {
        let body = src.len() / 8 * 8;
        for i in (0..body).step_by(8) {
            let h = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
        }
        dst[body..].iter_mut().zip(&src[body..]).for_each(|(d, &s)| *d = f16::from_f32(s));
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        // 1 + r + r² p
        let p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }

    /// Masks of the four 16-lane chunks starting at float `c` of a `len`-float row (all-zero past its end).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn chunk_masks(c: usize, len: usize) -> [__mmask16; 4] {
        std::array::from_fn(|t| {
            let start = c + 16 * t;
            if start >= len {
                0
            } else if start + 16 <= len {
                0xffff
            } else {
                tail_mask(len - start)
            }
        })
    }

    /// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce4([a, b, c, d]: [__m512; 4]) -> __m128 {
        // Within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], likewise for c and d ...
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // ... then [a, b, c, d] partial sums in each 128-bit lane, and the four lanes added.
        let abcd = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(ab, cd), _mm512_shuffle_ps::<0xEE>(ab, cd));
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(abcd),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd))),
        );
        _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps::<1>(halves))
    }

    impl Lanes for Avx512 {
        /// Four keys at a time, each with its own accumulator: four independent FMA chains share each load of `q`,
        /// and one transpose-and-add reduces the four accumulators together.
        #[inline(always)]
        unsafe fn scores<E: KvElem>(q: &[f32], keys: &[E], stride: usize, scale: f32, out: &mut [f32]) -> f32 {
            let d = q.len();
            let mut max = _mm_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j < out.len() {
                let keys_here = (out.len() - j).min(4);
                // A fixed four rows (the last one repeated past the end, its sums not stored), so that the four
                // accumulators stay in registers.
                let rows: [*const E; 4] =
                    std::array::from_fn(|t| keys.as_ptr().add((j + t.min(keys_here - 1)) * stride));
                let (mut a0, mut a1, mut a2, mut a3) =
                    (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
                let mut c = 0;
                while c < d {
                    let m = if c + 16 <= d { 0xffff } else { tail_mask(d - c) };
                    let qv = _mm512_maskz_loadu_ps(m, q.as_ptr().add(c));
                    a0 = _mm512_fmadd_ps(qv, E::load16(rows[0].add(c), m), a0);
                    a1 = _mm512_fmadd_ps(qv, E::load16(rows[1].add(c), m), a1);
                    a2 = _mm512_fmadd_ps(qv, E::load16(rows[2].add(c), m), a2);
                    a3 = _mm512_fmadd_ps(qv, E::load16(rows[3].add(c), m), a3);
                    c += 16;
                }
                let sums = _mm_mul_ps(reduce4([a0, a1, a2, a3]), _mm_set1_ps(scale));
                let m = ((1u32 << keys_here) - 1) as __mmask8;
                _mm_mask_storeu_ps(out.as_mut_ptr().add(j), m, sums);
                max = _mm_mask_max_ps(max, m, max, sums);
                j += keys_here;
            }
            let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
            _mm_cvtss_f32(_mm_max_ss(max, _mm_movehdup_ps(max)))
        }

        /// 64 floats of `acc` held in four registers while every value row streams by.
        #[inline(always)]
        unsafe fn accumulate<E: KvElem>(acc: &mut [f32], weights: &[f32], values: &[E], stride: usize) {
            let d = acc.len();
            for c in (0..d).step_by(64) {
                let m = chunk_masks(c, d);
                let p = acc.as_mut_ptr().add(c);
                let mut a: [__m512; 4] = std::array::from_fn(|t| _mm512_maskz_loadu_ps(m[t], p.add(16 * t)));
                for (j, &w) in weights.iter().enumerate() {
                    let w = _mm512_set1_ps(w);
                    let v = values.as_ptr().add(j * stride + c);
                    for t in 0..4 {
                        a[t] = _mm512_fmadd_ps(w, E::load16(v.add(16 * t), m[t]), a[t]);
                    }
                }
                for t in 0..4 {
                    _mm512_mask_storeu_ps(p.add(16 * t), m[t], a[t]);
                }
            }
        }

        #[inline(always)]
        unsafe fn scale(y: &mut [f32], a: f32) {
            let a = _mm512_set1_ps(a);
            let mut i = 0;
            while i + 16 <= y.len() {
                let p = y.as_mut_ptr().add(i);
                _mm512_storeu_ps(p, _mm512_mul_ps(a, _mm512_loadu_ps(p)));
                i += 16;
            }
            if i < y.len() {
                let m = tail_mask(y.len() - i);
                let p = y.as_mut_ptr().add(i);
                _mm512_mask_storeu_ps(p, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, p)));
            }
        }

        #[inline(always)]
        unsafe fn widen(src: &[f16], dst: &mut [f32]) {
            let mut i = 0;
            while i + 16 <= dst.len() {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
            if i < dst.len() {
                let m = tail_mask(dst.len() - i);
                let h = _mm256_maskz_loadu_epi16(m, src.as_ptr().add(i).cast());
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), m, _mm512_cvtph_ps(h));
            }
        }

        #[inline(always)]
        unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
            let shift = _mm512_set1_ps(shift);
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < x.len() {
                let m = if i + 16 <= x.len() { 0xffff } else { tail_mask(x.len() - i) };
                let p = x.as_mut_ptr().add(i);
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), shift));
                _mm512_mask_storeu_ps(p, m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
                i += 16;
            }
            _mm512_reduce_add_ps(sum)
        }
    }

    pub(super) struct Avx2;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(LOG2E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2ⁿ built in the exponent field: n ≥ -126 after the clamp, so it is a normal number.
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce256(v: __m256) -> f32 {
        crate::kernels::x86::reduce_add_256(v)
    }

    impl Avx2 {
        #[inline(always)]
        unsafe fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let body = a.len() / 8 * 8;
            for i in (0..body).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), E::load8(b.as_ptr().add(i)), acc);
            }
            reduce256(acc) + a[body..].iter().zip(&b[body..]).map(|(x, y)| x * y.to_f32()).sum::<f32>()
        }

        #[inline(always)]
        unsafe fn axpy<E: KvElem>(y: &mut [f32], a: f32, x: &[E]) {
            let av = _mm256_set1_ps(a);
            let body = y.len() / 8 * 8;
            for i in (0..body).step_by(8) {
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(av, E::load8(x.as_ptr().add(i)), _mm256_loadu_ps(p)));
            }
            y[body..].iter_mut().zip(&x[body..]).for_each(|(y, x)| *y += a * x.to_f32());
        }
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn scores<E: KvElem>(q: &[f32], keys: &[E], stride: usize, scale: f32, out: &mut [f32]) -> f32 {
            out.iter_mut().enumerate().fold(f32::NEG_INFINITY, |max, (j, o)| {
                *o = Avx2::dot(q, &keys[j * stride..][..q.len()]) * scale;
                max.max(*o)
            })
        }

        #[inline(always)]
        unsafe fn accumulate<E: KvElem>(acc: &mut [f32], weights: &[f32], values: &[E], stride: usize) {
            for (j, &w) in weights.iter().enumerate() {
                Avx2::axpy(acc, w, &values[j * stride..][..acc.len()]);
            }
        }

        #[inline(always)]
        unsafe fn scale(y: &mut [f32], a: f32) {
            let av = _mm256_set1_ps(a);
            let body = y.len() / 8 * 8;
            for i in (0..body).step_by(8) {
                let p = y.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_mul_ps(av, _mm256_loadu_ps(p)));
            }
            Scalar::scale(&mut y[body..], a);
        }

        #[inline(always)]
        unsafe fn widen(src: &[f16], dst: &mut [f32]) {
            let body = dst.len() / 8 * 8;
            for i in (0..body).step_by(8) {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            Scalar::widen(&src[body..], &mut dst[body..]);
        }

        #[inline(always)]
        unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
            let sv = _mm256_set1_ps(shift);
            let mut sum = _mm256_setzero_ps();
            let body = x.len() / 8 * 8;
            for i in (0..body).step_by(8) {
                let p = x.as_mut_ptr().add(i);
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p), sv));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
            reduce256(sum) + Scalar::exp_shifted(&mut x[body..], shift)
        }
    }
}
