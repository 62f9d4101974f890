//! AVX-512 VNNI matrix × matrix for prompt processing: many activation rows against the same weights.
//!
//! With many activation rows the work is compute bound, and unpacking each weight block again for every activation
//! row (what the row kernels do) would dominate. So each chunk of weight rows is unpacked once into signed bytes
//! (the "panel"), and a register-blocked micro-kernel multiplies it with the activations of 16 rows at a time
//! ("tiles"), one activation row per 32-bit lane:
//!
//! * tiles hold the activations as unsigned bytes `x + 128`, transposed so that one 64-byte load gives four
//!   consecutive values of 16 activation rows; `vpdpbusd` takes them against a broadcast of four weights;
//! * the `+ 128` is undone by starting each group's sum at `-128 · Σ w` (the panel stores that per row and group);
//! * per group (32 values; 17 for q6_K) the integer sums are scaled by the activation scales (a vector over the 16
//!   activation rows) and the weight scale (a broadcast), and for q4_K the group minimum is subtracted.
//!
//! Each weight byte is read from memory once per call; the panel of a chunk (32 rows) stays in L2 while every
//! activation tile passes over it, eight weight rows at a time.

use std::arch::x86_64::*;

use crate::acts::{quantize_q8_0_natural, ActsQ8K};
use crate::blocks::{scales_mins_k4_words, BlockQ4K, BlockQ4_0, BlockQ6K, BlockQ8_0};
use crate::isa::Isa;
use crate::kernels::avx512::{load_q4_0_pair, low_then_high_nibbles, prefetch_ahead, GF2_HIGH_NIBBLE, GF2_LOW_NIBBLE};
use crate::kernels::x86::half_at;
use crate::kernels::{traits, ActKind};
use crate::matrix::QuantMatrix;
use crate::packed::{self, GROUP_ROWS};
use crate::schedule::{run_rows, Schedule, Scratch, SharedOut};
use crate::tuning::{Prefetch, Tuning, PREFETCH_NTA, PREFETCH_OFF, PREFETCH_T0};
use crate::types::{GgmlType, QK, QK_K};
use rayon::ThreadPool;
use std::cell::RefCell;
use std::ops::Range;
use std::thread::LocalKey;

/// Weight rows unpacked together; a multiple of [`KERNEL_ROWS`].
pub(crate) const CHUNK_ROWS: usize = 32;
/// Weight rows per micro-kernel call (eight accumulators of 16 activation rows each).
const KERNEL_ROWS: usize = 8;
/// Activation rows per tile: one per 32-bit lane.
const TILE: usize = 16;

/// The activations of one call, transposed into tiles of 16 rows.
pub(crate) struct ActTiles {
    quads: usize,
    groups: usize,
    /// `tiles × quads × 64` bytes: for each run of four values, those values `+ 128` of 16 activation rows.
    xq: Vec<u8>,
    /// `tiles × scales × 16`: the activation scales per activation row, one per q8_0 block or q8_K super-block.
    scale: Vec<f32>,
    /// q4_K only, `tiles × groups × 16`: each group's sum of activation quants (what the minimum multiplies).
    sum: Vec<f32>,
}

impl ActTiles {
    /// Quantizes the `n × k` activations `x` as ggml does for weights of type `ty` and lays them out in tiles, the
    /// tiles split over `pool`'s threads (with one thread this was ~6% of a 5120×5120 q4_0 product at n = 512).
    pub fn new(ty: GgmlType, x: &[f32], n: usize, k: usize, pool: &ThreadPool) -> ActTiles {
        let tiles = n.div_ceil(TILE);
        let quads = k / 4;
        let group = traits(ty).group_len;
        let groups = k / group;
        let q8_0 = matches!(traits(ty).act, ActKind::Q8_0 { .. });
        let scales = if q8_0 { k / QK } else { k / QK_K };
        let mut t = ActTiles {
            quads,
            groups,
            xq: vec![0x80; tiles * quads * 64],
            scale: vec![0.0; tiles * scales * TILE],
            sum: if ty == GgmlType::Q4_K { vec![0.0; tiles * groups * TILE] } else { Vec::new() },
        };
        let shared = SharedTiles { xq: t.xq.as_mut_ptr(), scale: t.scale.as_mut_ptr(), sum: t.sum.as_mut_ptr() };
        let parallel = n * k >= 1 << 16;
        let t_sum_len = if ty == GgmlType::Q4_K { groups * TILE } else { 0 };
        run_rows(pool, tiles, Schedule::Fixed(1), parallel, |range, _: &mut ()| {
            let mut qs = vec![0i8; k];
            let mut d = vec![0f32; k / QK];
            for tile in range {
                // SAFETY: each tile is taken by one chunk only, so these parts of the buffers are this thread's.
                let (xq, scale, sum) = unsafe { shared.tile(tile, quads * 64, scales * TILE, t_sum_len) };
                for lane in 0..TILE.min(n - tile * TILE) {
                    let c = tile * TILE + lane;
                    let row = &x[c * k..(c + 1) * k];
                    if q8_0 {
                        // SAFETY: the GEMM path runs only where AVX-512 is available.
                        unsafe { quantize_q8_0_natural(row, &mut qs, &mut d) };
                        for (j, &d) in d.iter().enumerate() {
                            scale[j * TILE + lane] = d;
                        }
                        scatter(&qs, xq, lane);
                    } else {
                        let blocks = ActsQ8K::new(row, 1, k, Isa::Avx512);
                        for (b, block) in blocks.data.iter().enumerate() {
                            scale[b * TILE + lane] = block.d;
                            qs[b * QK_K..(b + 1) * QK_K].copy_from_slice(&block.qs);
                        }
                        scatter(&qs, xq, lane);
                        if ty == GgmlType::Q4_K {
                            for g in 0..groups {
                                let block = &blocks.data[g * group / QK_K];
                                let first = (g * group % QK_K) / 16;
                                let bsum = block.bsums[first] as i32 + block.bsums[first + 1] as i32;
                                sum[g * TILE + lane] = bsum as f32;
                            }
                        }
                    }
                }
            }
        });
        t
    }
}

/// Writes a row's quants `qs` (natural order) into lane `lane` of a tile: four values per 64-byte run, `+ 128`.
fn scatter(qs: &[i8], xq: &mut [u8], lane: usize) {
    for (quad, four) in qs.chunks_exact(4).enumerate() {
        let v = u32::from_le_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]) ^ 0x8080_8080;
        xq[quad * 64 + 4 * lane..quad * 64 + 4 * lane + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// The tile buffers while the threads fill them, each its own tiles.
#[derive(Clone, Copy)]
struct SharedTiles {
    xq: *mut u8,
    scale: *mut f32,
    sum: *mut f32,
}

impl SharedTiles {
    /// Tile `tile`'s parts of the three buffers, of `xq_len`, `scale_len` and `sum_len` elements per tile.
    ///
    /// # Safety
    /// The tile must be within the buffers and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn tile<'t>(
        &self,
        tile: usize,
        xq_len: usize,
        scale_len: usize,
        sum_len: usize,
    ) -> (&'t mut [u8], &'t mut [f32], &'t mut [f32]) {
        (
            std::slice::from_raw_parts_mut(self.xq.add(tile * xq_len), xq_len),
            std::slice::from_raw_parts_mut(self.scale.add(tile * scale_len), scale_len),
            if sum_len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(self.sum.add(tile * sum_len), sum_len) },
        )
    }
}

// SAFETY: only handed to the chunks of one `ActTiles::new`, which write disjoint tiles.
unsafe impl Send for SharedTiles {}
unsafe impl Sync for SharedTiles {}

/// One chunk of weight rows unpacked to signed bytes in value order, with per-group constants.
#[derive(Default)]
pub(crate) struct GemmScratch {
    /// `CHUNK_ROWS × k` signed weights.
    q: Vec<i8>,
    /// `CHUNK_ROWS × groups` weight scales (`d`, or `d · scale` for the k-quants).
    scale: Vec<f32>,
    /// `CHUNK_ROWS × groups`: `-128 · Σ w`, the start of each group sum.
    corr: Vec<i32>,
    /// q4_K only, `CHUNK_ROWS × groups`: `-dmin · min`.
    min: Vec<f32>,
    /// One weight row in GGUF's layout, for matrices in an interleaved one.
    row: Vec<u8>,
    /// Whether `q` holds the chunk quad-major by eight rows (the four values of quad `u` of row `i` at `(i - i % 8)
    /// · k + 32u + 4 · (i % 8)`, what interleaved rows unpack to: each micro-kernel call then reads one dense run)
    /// rather than row-major (at `i · stride + 4u`: `stride` is `k`, or `k + 64` for the AMX tiles, see [`gemm`]).
    quad_major: bool,
}

impl Scratch for GemmScratch {
    fn local() -> &'static LocalKey<RefCell<GemmScratch>> {
        thread_local! {
            static PANEL: RefCell<GemmScratch> = RefCell::default();
        }
        &PANEL
    }
}

/// Computes the outputs of weight rows `rows` (at most [`CHUNK_ROWS`]) for all `n` activation rows, with the
/// integer products on AMX tiles where `amx` (q4_0 and q8_0: [`super::traits`]'s `amx`), on `vpdpbusd` otherwise;
/// the same bits either way.
///
/// # Safety
/// AVX-512 (the `Isa::Avx512` set) must be available, and with `amx` also [`super::amx::available`]; `out` must be
/// exclusively this chunk's for `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,f16c,fma")]
pub(crate) unsafe fn gemm(
    w: &QuantMatrix,
    rows: Range<usize>,
    tiles: &ActTiles,
    n: usize,
    out: SharedOut,
    scratch: &mut GemmScratch,
    amx: bool,
) {
    let k = w.cols();
    let groups = tiles.groups;
    debug_assert!(!amx || super::traits(w.ty()).amx, "no AMX tiles for {}", w.ty());
    // The distance of the row-major panel's rows: for the AMX tiles `k + 64`, so that the 16 rows of a tile do not
    // all fall into the same L1 set when `k` is a multiple of 4096.
    let stride = if amx { k + 64 } else { k };
    scratch.q.resize(CHUNK_ROWS * stride, 0);
    scratch.scale.resize(CHUNK_ROWS * groups, 0.0);
    scratch.corr.resize(CHUNK_ROWS * groups, 0);
    if w.ty() == GgmlType::Q4_K {
        scratch.min.resize(CHUNK_ROWS * groups, 0.0);
    }
    let grouped = packed::grouped_rows(w);
    scratch.row.resize(if grouped > 0 { w.row_bytes() } else { 0 }, 0);
    // A chunk of interleaved groups only is unpacked straight into the quad-major panel, a whole vector of 16 rows
    // at a time (for the AMX tiles, which take the weight rows row-major, each vector scattered to its 16 rows); a
    // chunk with rows in GGUF's layout (the last, when the rows are not a multiple of 16) row by row.
    let whole_groups = grouped > 0 && rows.end <= grouped;
    scratch.quad_major = !amx && whole_groups;
    if whole_groups {
        for (half, start) in rows.clone().step_by(GROUP_ROWS).enumerate() {
            let group = w.rows_data(start..start + GROUP_ROWS).as_ptr();
            let panel = (&mut scratch.q[..], &mut scratch.scale[..], &mut scratch.corr[..]);
            if w.ty() == GgmlType::Q4_K {
                unpack_group_q4_k(group, k / QK_K, half * GROUP_ROWS, panel, &mut scratch.min);
            } else if w.ty() == GgmlType::Q6_K {
                unpack_group_q6_k(group, k / QK_K, half * GROUP_ROWS, panel);
            } else {
                unpack_group(w.ty(), group, k / QK, half * GROUP_ROWS, panel, amx.then_some(stride));
            }
        }
        if rows.len() < CHUNK_ROWS {
            // Rows past the matrix: zeros, whose outputs are never stored.
            scratch.q[GROUP_ROWS * stride..].fill(0);
            scratch.scale[GROUP_ROWS * groups..].fill(0.0);
            scratch.corr[GROUP_ROWS * groups..].fill(0);
            if w.ty() == GgmlType::Q4_K {
                scratch.min[GROUP_ROWS * groups..].fill(0.0);
            }
        }
    }
    let row_by_row = if whole_groups { 0 } else { CHUNK_ROWS };
    for i in 0..row_by_row {
        let (q, scale) = (&mut scratch.q[i * stride..i * stride + k], &mut scratch.scale[i * groups..(i + 1) * groups]);
        let corr = &mut scratch.corr[i * groups..(i + 1) * groups];
        let r = rows.start + i;
        if r >= rows.end {
            // Rows past the matrix: zeros, whose outputs are never stored.
            q.fill(0);
            scale.fill(0.0);
            corr.fill(0);
            continue;
        }
        let (src, end) = if r < grouped {
            // An interleaved row: put back in GGUF's layout first (a copy of one row, in L1).
            packed::ggml_row(w, r, &mut scratch.row).expect("a row of the matrix");
            (scratch.row.as_ptr(), scratch.row.as_ptr_range().end)
        } else {
            (w.rows_data(r..r + 1).as_ptr(), w.data().as_ptr_range().end)
        };
        match w.ty() {
            GgmlType::Q4_0 => with_prefetch!(unpack_q4_0[](src, end, k / QK, q, scale, corr)),
            GgmlType::Q8_0 => with_prefetch!(unpack_q8_0[](src, end, k / QK, q, scale, corr)),
            GgmlType::Q4_K => {
                let min = &mut scratch.min[i * groups..(i + 1) * groups];
                with_prefetch!(unpack_q4_k[](src, end, k / QK_K, q, scale, corr, min))
            }
            GgmlType::Q6_K => with_prefetch!(unpack_q6_k[](src, end, k / QK_K, q, scale, corr)),
            ty => unreachable!("no GEMM unpacking for {ty}"),
        }
    }
    if amx {
        let panel = super::amx::Panel { q: &scratch.q, stride, corr: &scratch.corr, scale: &scratch.scale };
        super::amx::gemm_q8_0_groups(panel, CHUNK_ROWS, k, &tiles.xq, &tiles.scale, n, rows.start, rows.end, out);
        return;
    }
    let tile_count = n.div_ceil(TILE);
    let mut tile = 0;
    while tile < tile_count {
        // Two tiles per kernel call where there are two: each weight broadcast then feeds two `vpdpbusd`, and 16
        // independent sums hide the instruction's latency.
        if tile + 1 < tile_count {
            kernel_tiles::<2>(w.ty(), scratch, &rows, k, tiles, tile, n, out);
            tile += 2;
        } else {
            kernel_tiles::<1>(w.ty(), scratch, &rows, k, tiles, tile, n, out);
            tile += 1;
        }
    }
}

/// The chunk's weight rows `rows`, [`KERNEL_ROWS`] at a time, against the `T` tiles from `tile`: the kernel for
/// the type, and its results stored.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn kernel_tiles<const T: usize>(
    ty: GgmlType,
    scratch: &GemmScratch,
    rows: &Range<usize>,
    k: usize,
    tiles: &ActTiles,
    tile: usize,
    n: usize,
    out: SharedOut,
) {
    for first in (0..rows.len()).step_by(KERNEL_ROWS) {
        let acc = match ty {
            GgmlType::Q6_K if scratch.quad_major => kernel::<T, 4, 16, false, true>(scratch, first, k, tiles, tile),
            GgmlType::Q6_K => kernel::<T, 4, 16, false, false>(scratch, first, k, tiles, tile),
            GgmlType::Q4_K if scratch.quad_major => kernel::<T, 8, 8, true, true>(scratch, first, k, tiles, tile),
            GgmlType::Q4_K => kernel::<T, 8, 8, true, false>(scratch, first, k, tiles, tile),
            _ if scratch.quad_major => kernel::<T, 8, 1, false, true>(scratch, first, k, tiles, tile),
            _ => kernel::<T, 8, 1, false, false>(scratch, first, k, tiles, tile),
        };
        for (t, acc) in acc.iter().enumerate() {
            store_tile(acc, tile + t, rows.start + first, rows.end, n, out);
        }
    }
}

/// Writes one kernel result: weight rows `first_row..` (those before `end`) for the activation rows of `tile`.
///
/// # Safety
/// As [`gemm`]: `out` must be exclusively this chunk's for these rows.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_tile(acc: &[__m512; KERNEL_ROWS], tile: usize, first_row: usize, end: usize, n: usize, out: SharedOut) {
    let mut lanes = [0f32; TILE];
    for (i, acc) in acc.iter().enumerate() {
        let r = first_row + i;
        if r >= end {
            break;
        }
        _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
        for (lane, &v) in lanes.iter().enumerate().take(n - tile * TILE) {
            out.column(tile * TILE + lane, r..r + 1)[0] = v;
        }
    }
}

/// Eight weight rows (from `first` in the panel) against `T` tiles of 16 activation rows (from `tile`) over all of
/// `k`: `QUADS` runs of four values per group, `GROUPS_PER_SCALE` groups per activation scale (1 for q8_0
/// activations, 8 or 16 for q8_K's super-blocks), `MINS` to subtract q4_K's group minimums.
///
/// With one activation scale per super-block, the groups' contributions are summed scaled by the weight scale
/// only, and the activation scale is applied once per super-block: one multiply fewer per group. Each tile's sums
/// go through the same operations in the same order whatever `T` is: the results do not depend on it.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
#[allow(clippy::needless_range_loop)] // `isum[t][r]`: two indices, neither the loop's own array
unsafe fn kernel<
    const T: usize,
    const QUADS: usize,
    const GROUPS_PER_SCALE: usize,
    const MINS: bool,
    const QUAD_MAJOR: bool,
>(
    panel: &GemmScratch,
    first: usize,
    k: usize,
    tiles: &ActTiles,
    tile: usize,
) -> [[__m512; KERNEL_ROWS]; T] {
    let groups = tiles.groups;
    let scales = groups / GROUPS_PER_SCALE;
    let xq: [*const u8; T] = std::array::from_fn(|t| tiles.xq.as_ptr().add((tile + t) * tiles.quads * 64));
    let xscale: [*const f32; T] = std::array::from_fn(|t| tiles.scale.as_ptr().add((tile + t) * scales * TILE));
    let xsum: [*const f32; T] =
        std::array::from_fn(
            |t| {
                if MINS {
                    tiles.sum.as_ptr().add((tile + t) * groups * TILE)
                } else {
                    std::ptr::null()
                }
            },
        );
    // Where quad `u` of the panel's row `first + r` is: `rows[r] + u · quad_stride`.
    debug_assert_eq!(panel.quad_major, QUAD_MAJOR);
    let (row_stride, quad_stride) = if QUAD_MAJOR { (4, 4 * KERNEL_ROWS) } else { (k, 4) };
    let wrows: [*const i8; KERNEL_ROWS] = std::array::from_fn(|r| panel.q.as_ptr().add(first * k + r * row_stride));
    let wscale = panel.scale.as_ptr().add(first * groups);
    let wcorr = panel.corr.as_ptr().add(first * groups);
    let wmin = if MINS { panel.min.as_ptr().add(first * groups) } else { std::ptr::null() };
    let mut acc = [[_mm512_setzero_ps(); KERNEL_ROWS]; T];
    for s in 0..scales {
        let mut part = [[_mm512_setzero_ps(); KERNEL_ROWS]; T];
        for g in s * GROUPS_PER_SCALE..(s + 1) * GROUPS_PER_SCALE {
            let start: [__m512i; KERNEL_ROWS] = std::array::from_fn(|r| _mm512_set1_epi32(*wcorr.add(r * groups + g)));
            let mut isum = [start; T];
            for q in 0..QUADS {
                let quad = g * QUADS + q;
                let x: [__m512i; T] = std::array::from_fn(|t| _mm512_loadu_si512(xq[t].add(quad * 64).cast()));
                for r in 0..KERNEL_ROWS {
                    let four = _mm512_set1_epi32(std::ptr::read_unaligned(wrows[r].add(quad * quad_stride).cast()));
                    for t in 0..T {
                        isum[t][r] = _mm512_dpbusd_epi32(isum[t][r], x[t], four);
                    }
                }
            }
            for t in 0..T {
                if GROUPS_PER_SCALE == 1 {
                    let xs = _mm512_loadu_ps(xscale[t].add(s * TILE));
                    for (r, acc) in acc[t].iter_mut().enumerate() {
                        let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(isum[t][r]), xs);
                        *acc = _mm512_fmadd_ps(scaled, _mm512_set1_ps(*wscale.add(r * groups + g)), *acc);
                    }
                } else {
                    for (r, part) in part[t].iter_mut().enumerate() {
                        let ws = _mm512_set1_ps(*wscale.add(r * groups + g));
                        *part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][r]), ws, *part);
                        if MINS {
                            let sums = _mm512_loadu_ps(xsum[t].add(g * TILE));
                            *part = _mm512_fmadd_ps(_mm512_set1_ps(*wmin.add(r * groups + g)), sums, *part);
                        }
                    }
                }
            }
        }
        if GROUPS_PER_SCALE > 1 {
            for t in 0..T {
                let xs = _mm512_loadu_ps(xscale[t].add(s * TILE));
                for (acc, part) in acc[t].iter_mut().zip(part[t]) {
                    *acc = _mm512_fmadd_ps(part, xs, *acc);
                }
            }
        }
    }
    acc
}

/// The byte sums of each 8-byte run of `v` (`vpsadbw` against zero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn sums_of_8(v: __m512i) -> [u64; 8] {
    std::mem::transmute(_mm512_sad_epu8(v, _mm512_setzero_si512()))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,gfni,f16c")]
unsafe fn unpack_q4_0<const PF: u8>(
    row: *const u8,
    end: *const u8,
    blocks: usize,
    q: &mut [i8],
    scale: &mut [f32],
    corr: &mut [i32],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();
    // Block b of the pair: bytes 0..16 of its values are the low nibbles of its 16 quant bytes, 16..32 the high.
    // `load_q4_0_pair` puts the first block's quants at bytes 2..18 and the second's at 32..48.
    let idx: [u8; 64] = std::array::from_fn(|o| (if o < 32 { 2 } else { 32 } + o % 16) as u8);
    let idx = _mm512_loadu_si512(idx.as_ptr().cast());
    let nibbles = _mm512_set_epi64(
        GF2_HIGH_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_HIGH_NIBBLE,
        GF2_LOW_NIBBLE,
        GF2_LOW_NIBBLE,
    );
    for pair in 0..blocks.div_ceil(2) {
        let in_pair = (blocks - 2 * pair).min(2);
        prefetch_ahead::<1, PF>(row.add(2 * BLOCK_BYTES * pair), end);
        let raw = load_q4_0_pair(row.add(2 * BLOCK_BYTES * pair), in_pair == 2);
        let u = _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_permutexvar_epi8(idx, raw), nibbles);
        _mm512_mask_storeu_epi8(
            q.as_mut_ptr().add(64 * pair).cast(),
            mask(32 * in_pair),
            _mm512_sub_epi8(u, _mm512_set1_epi8(8)),
        );
        let sums = sums_of_8(u);
        for b in 0..in_pair {
            let j = 2 * pair + b;
            let unsigned: u64 = sums[4 * b..4 * b + 4].iter().sum();
            corr[j] = -128 * (unsigned as i32 - 8 * 32);
            scale[j] = half_at(row.add(BLOCK_BYTES * j));
        }
    }
}

/// Stores `values`, quad `quad` of the 16 panel rows from `first` (one lane a row), into the quad-major panel
/// `panel_q` of `k` values a row: the first eight rows' lanes to their dense run, the last eight to theirs.
///
/// # Safety
/// `panel_q` must hold rows `first..first + 16` of `k` values, and `quad` be below `k / 4`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_quad_major(panel_q: *mut i8, first: usize, k: usize, quad: usize, values: __m512i) {
    _mm256_storeu_si256(panel_q.add(first * k + 32 * quad).cast(), _mm512_castsi512_si256(values));
    _mm256_storeu_si256(panel_q.add((first + 8) * k + 32 * quad).cast(), _mm512_extracti64x4_epi64::<1>(values));
}

/// Interleaved q4_0 or q8_0 rows ([`crate::packed`]): the group at `group` (16 rows of `blocks` blocks) into panel
/// rows `first..first + 16` of the quad-major panel `(q, scale, corr)`. Each vector of the group is four quants of
/// each of its rows, and in the quad-major panel a quad of 8 rows is 8 consecutive 32-bit lanes: two stores. For
/// q4_0 a vector's low nibbles are quad `8j + t` of those rows and its high nibbles quad `8j + 4 + t`; for q8_0
/// vector `t` is quad `8j + t`. With `row_major: Some(stride)`, the panel is row-major instead (quad `u` of row `i`
/// at `i · stride + 4u`, for the AMX tiles): each vector is scattered to its 16 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn unpack_group(
    ty: GgmlType,
    group: *const u8,
    blocks: usize,
    first: usize,
    panel: (&mut [i8], &mut [f32], &mut [i32]),
    row_major: Option<usize>,
) {
    let (q, scale, corr) = panel;
    let groups = scale.len() / CHUNK_ROWS;
    let (low, eight, ones, flip) =
        (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(8), _mm512_set1_epi8(1), _mm512_set1_epi8(-128));
    let (panel_q, k) = (q.as_mut_ptr(), blocks * QK);
    // Quad `quad` of the 16 rows: the first eight rows' lanes to their run, the last eight to theirs; or, row-major,
    // lane `r` to row `r`.
    let stride = row_major.unwrap_or(k);
    let rows_apart = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(stride as i32),
    );
    let store = |quad: usize, signed: __m512i| {
        if row_major.is_some() {
            _mm512_i32scatter_epi32::<1>(panel_q.add(first * stride + 4 * quad).cast(), rows_apart, signed);
            return;
        }
        store_quad_major(panel_q, first, k, quad, signed);
    };
    let mut lanes = [0i32; GROUP_ROWS];
    let mut scales = [0f32; GROUP_ROWS];
    for j in 0..blocks {
        let (quants, scale_at) = packed::block_offsets(ty, blocks, j);
        // Σ of the stored (unsigned) values of each row's block, and the zero point they carry.
        let mut unsigned_sum = _mm512_setzero_si512();
        let zero_point = if ty == GgmlType::Q4_0 {
            for t in 0..4 {
                let v = _mm512_loadu_si512(group.add(quants + 64 * t).cast());
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                unsigned_sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(unsigned_sum, lo, ones), hi, ones);
                store(8 * j + t, _mm512_sub_epi8(lo, eight));
                store(8 * j + 4 + t, _mm512_sub_epi8(hi, eight));
            }
            8
        } else {
            for t in 0..8 {
                let v = _mm512_loadu_si512(group.add(quants + 64 * t).cast());
                unsigned_sum = _mm512_dpbusd_epi32(unsigned_sum, v, ones);
                store(8 * j + t, _mm512_xor_si512(v, flip));
            }
            128
        };
        // -128 · Σ w, with w = stored - zero point over the block's 32 values.
        let signed_sum = _mm512_sub_epi32(unsigned_sum, _mm512_set1_epi32(zero_point * 32));
        _mm512_storeu_si512(lanes.as_mut_ptr().cast(), _mm512_mullo_epi32(signed_sum, _mm512_set1_epi32(-128)));
        _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(group.add(scale_at).cast())));
        for r in 0..GROUP_ROWS {
            corr[(first + r) * groups + j] = lanes[r];
            scale[(first + r) * groups + j] = scales[r];
        }
    }
}

/// Interleaved q4_K rows ([`crate::packed`]): the group at `group` (16 rows of `blocks` super-blocks) into panel
/// rows `first..first + 16` of the quad-major panel, as [`unpack_q4_k`] fills a row-major one: the nibbles as
/// they are, per 32 values `-128 · Σ w`, `d · scale` and `-dmin · min`. Vector `8q + t` of a super-block `b` is
/// quad `64b + 16q + t` of its rows in its low nibbles and quad `64b + 16q + 8 + t` in its high ones.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn unpack_group_q4_k(
    group: *const u8,
    blocks: usize,
    first: usize,
    panel: (&mut [i8], &mut [f32], &mut [i32]),
    min: &mut [f32],
) {
    use crate::blocks::unpack_scales_mins_k4;
    use crate::packed::{Q4_K_D, Q4_K_DMIN, Q4_K_GROUP_BYTES, Q4_K_QUANTS, Q4_K_SCALES};
    let (q, scale, corr) = panel;
    let groups = scale.len() / CHUNK_ROWS;
    let (low, ones) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(1));
    let (panel_q, k) = (q.as_mut_ptr(), blocks * QK_K);
    let store = |quad: usize, values: __m512i| store_quad_major(panel_q, first, k, quad, values);
    let mut lanes = [[0i32; GROUP_ROWS]; 2];
    let (mut d, mut dmin) = ([0f32; GROUP_ROWS], [0f32; GROUP_ROWS]);
    for b in 0..blocks {
        let sb = group.add(b * Q4_K_GROUP_BYTES);
        for quarter in 0..4 {
            let (mut lo_sum, mut hi_sum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for t in 0..8 {
                let v = _mm512_loadu_si512(sb.add(Q4_K_QUANTS + 64 * (8 * quarter + t)).cast());
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                lo_sum = _mm512_dpbusd_epi32(lo_sum, lo, ones);
                hi_sum = _mm512_dpbusd_epi32(hi_sum, hi, ones);
                store(64 * b + 16 * quarter + t, lo);
                store(64 * b + 16 * quarter + 8 + t, hi);
            }
            let minus_128 = _mm512_set1_epi32(-128);
            _mm512_storeu_si512(lanes[0].as_mut_ptr().cast(), _mm512_mullo_epi32(lo_sum, minus_128));
            _mm512_storeu_si512(lanes[1].as_mut_ptr().cast(), _mm512_mullo_epi32(hi_sum, minus_128));
            for r in 0..GROUP_ROWS {
                for h in 0..2 {
                    corr[(first + r) * groups + 8 * b + 2 * quarter + h] = lanes[h][r];
                }
            }
        }
        _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(Q4_K_D).cast())));
        _mm512_storeu_ps(dmin.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(Q4_K_DMIN).cast())));
        for r in 0..GROUP_ROWS {
            let packed: [u8; 12] = std::array::from_fn(|i| *sb.add(Q4_K_SCALES + 64 * (i / 4) + 4 * r + i % 4));
            let (scales, mins) = unpack_scales_mins_k4(&packed);
            for s in 0..8 {
                let at = (first + r) * groups + 8 * b + s;
                scale[at] = d[r] * scales[s] as f32;
                min[at] = -dmin[r] * mins[s] as f32;
            }
        }
    }
}

/// Interleaved q6_K rows ([`crate::packed`]): the group at `group` (16 rows of `blocks` super-blocks) into panel
/// rows `first..first + 16` of the quad-major panel, as [`unpack_q6_k`] fills a row-major one: the values less 32,
/// per 16 values `-128 · Σ w` and `d · scale`. The vectors of scale group `s` of super-block `b` are quads
/// `64b + 4s..64b + 4s + 4` of its rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn unpack_group_q6_k(group: *const u8, blocks: usize, first: usize, panel: (&mut [i8], &mut [f32], &mut [i32])) {
    use crate::packed::{q6_k_offsets, Q6_K_GROUP_QUANTS, Q6_K_QUANTS, Q6_K_SCALES};
    let (q, scale, corr) = panel;
    let groups = scale.len() / CHUNK_ROWS;
    let (ones, low6, thirty_two) = (_mm512_set1_epi8(1), _mm512_set1_epi8(0x3F), _mm512_set1_epi8(32));
    let (panel_q, k) = (q.as_mut_ptr(), blocks * QK_K);
    let store = |quad: usize, values: __m512i| store_quad_major(panel_q, first, k, quad, values);
    let (mut lanes, mut scales) = ([0i32; GROUP_ROWS], [0f32; GROUP_ROWS]);
    for b in 0..blocks {
        let (body_at, d_at) = q6_k_offsets(blocks, b);
        let body = group.add(body_at);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(group.add(d_at).cast()));
        for s in 0..16 {
            let [v0, v1, v2, v3x4] =
                super::avx512_packed::q6_k_group_values(body.add(Q6_K_QUANTS + s * Q6_K_GROUP_QUANTS));
            let v3 = _mm512_and_si512(_mm512_srli_epi16::<2>(v3x4), low6);
            let mut unsigned_sum = _mm512_setzero_si512();
            for (t, v) in [v0, v1, v2, v3].into_iter().enumerate() {
                unsigned_sum = _mm512_dpbusd_epi32(unsigned_sum, v, ones);
                store(64 * b + 4 * s + t, _mm512_sub_epi8(v, thirty_two));
            }
            // -128 · Σ w, with w = stored - 32 over the group's 16 values.
            let signed_sum = _mm512_sub_epi32(unsigned_sum, _mm512_set1_epi32(32 * 16));
            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), _mm512_mullo_epi32(signed_sum, _mm512_set1_epi32(-128)));
            let group_scales = _mm512_cvtepi8_epi32(_mm_loadu_si128(body.add(Q6_K_SCALES + 16 * s).cast()));
            _mm512_storeu_ps(scales.as_mut_ptr(), _mm512_mul_ps(d, _mm512_cvtepi32_ps(group_scales)));
            for r in 0..GROUP_ROWS {
                corr[(first + r) * groups + 16 * b + s] = lanes[r];
                scale[(first + r) * groups + 16 * b + s] = scales[r];
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,f16c")]
unsafe fn unpack_q8_0<const PF: u8>(
    row: *const u8,
    end: *const u8,
    blocks: usize,
    q: &mut [i8],
    scale: &mut [f32],
    corr: &mut [i32],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ8_0>();
    for j in 0..blocks {
        let b = row.add(BLOCK_BYTES * j);
        prefetch_ahead::<1, PF>(b, end);
        let v = _mm256_loadu_si256(b.add(2).cast());
        _mm256_storeu_si256(q.as_mut_ptr().add(32 * j).cast(), v);
        let offset = _mm512_zextsi256_si512(_mm256_xor_si256(v, _mm256_set1_epi8(-128)));
        let unsigned: u64 = sums_of_8(offset)[..4].iter().sum();
        corr[j] = -128 * (unsigned as i32 - 128 * 32);
        scale[j] = half_at(b);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,gfni,f16c")]
unsafe fn unpack_q4_k<const PF: u8>(
    row: *const u8,
    end: *const u8,
    blocks: usize,
    q: &mut [i8],
    scale: &mut [f32],
    corr: &mut [i32],
    min: &mut [f32],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
    let nibbles = low_then_high_nibbles();
    for i in 0..blocks {
        let b = row.add(BLOCK_BYTES * i);
        prefetch_ahead::<3, PF>(b, end);
        let (d, dmin) = (half_at(b), half_at(b.add(2)));
        let (scales, mins) = scales_mins_k4_words(&*b.add(4).cast::<[u8; 12]>());
        for c in 0..4 {
            let packed = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(16 + 32 * c).cast()));
            let u = _mm512_gf2p8affine_epi64_epi8::<0>(packed, nibbles);
            _mm512_storeu_si512(q.as_mut_ptr().add(QK_K * i + 64 * c).cast(), u);
            let sums = sums_of_8(u);
            for h in 0..2 {
                let g = 8 * i + 2 * c + h;
                let sub = 2 * c + h;
                let total: u64 = sums[4 * h..4 * h + 4].iter().sum();
                corr[g] = -128 * total as i32;
                scale[g] = d * ((scales >> (8 * sub)) & 0xFF) as f32;
                min[g] = -dmin * ((mins >> (8 * sub)) & 0xFF) as f32;
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,gfni,f16c")]
unsafe fn unpack_q6_k<const PF: u8>(
    row: *const u8,
    end: *const u8,
    blocks: usize,
    q: &mut [i8],
    scale: &mut [f32],
    corr: &mut [i32],
) {
    const BLOCK_BYTES: usize = size_of::<BlockQ6K>();
    let low_nibble = _mm512_set1_epi8(0x0F);
    let high_nibble = _mm512_set1_epi64(GF2_HIGH_NIBBLE);
    let two_bits = |s: i8| crate::kernels::avx512::gf2_bit_select([-1, -1, -1, -1, s, s + 1, -1, -1]);
    let top_first = _mm512_set_epi64(
        two_bits(2),
        two_bits(2),
        two_bits(2),
        two_bits(2),
        two_bits(0),
        two_bits(0),
        two_bits(0),
        two_bits(0),
    );
    let top_second = _mm512_set_epi64(
        two_bits(6),
        two_bits(6),
        two_bits(6),
        two_bits(6),
        two_bits(4),
        two_bits(4),
        two_bits(4),
        two_bits(4),
    );
    for i in 0..blocks {
        let b = row.add(BLOCK_BYTES * i);
        prefetch_ahead::<4, PF>(b, end);
        let d = half_at(b.add(208));
        for half in 0..2 {
            let ql = _mm512_loadu_si512(b.add(64 * half).cast());
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * half).cast()));
            let first =
                _mm512_or_si512(_mm512_and_si512(ql, low_nibble), _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_first));
            let second = _mm512_or_si512(
                _mm512_gf2p8affine_epi64_epi8::<0>(ql, high_nibble),
                _mm512_gf2p8affine_epi64_epi8::<0>(qh, top_second),
            );
            for (t, u) in [first, second].into_iter().enumerate() {
                let at = QK_K * i + 128 * half + 64 * t;
                _mm512_storeu_si512(q.as_mut_ptr().add(at).cast(), _mm512_sub_epi8(u, _mm512_set1_epi8(32)));
                let sums = sums_of_8(u);
                for s in 0..4 {
                    let g = at / 16 + s;
                    let unsigned = sums[2 * s] + sums[2 * s + 1];
                    corr[g] = -128 * (unsigned as i32 - 32 * 16);
                    scale[g] = d * *b.add(192 + g % 16).cast::<i8>() as f32;
                }
            }
        }
    }
}

fn mask(bytes: usize) -> __mmask64 {
    if bytes >= 64 {
        !0
    } else {
        (1u64 << bytes) - 1
    }
}
