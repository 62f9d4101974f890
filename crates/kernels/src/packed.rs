//! Weight matrices rewritten once, when a model is loaded, into a layout the kernels read with fewer instructions
//! per byte than GGUF's (as llama.cpp's `ggml-cpu/repack.cpp` does; the layout here is our own).
//!
//! # q4_0, 16 rows interleaved ([`Layout::Interleaved16`])
//! GGUF stores a q4_0 row as 18-byte blocks (an f16 scale, then 16 bytes holding 32 nibbles), so a kernel that
//! multiplies one row at a time must gather scales from odd offsets, assemble 16-byte pieces into vectors, and
//! reduce each row's sums across the lanes at the end. Interleaved, 16 rows share every vector: a 64-byte load
//! holds four quant bytes (eight values) of each of 16 rows, one row per 32-bit lane, so `vpdpbusd` against a
//! broadcast of four activation bytes sums each row in its own lane, and the 16 scales of a block are one 32-byte
//! load. Nothing is reduced across lanes; 16 outputs are stored with one instruction.
//!
//! Rows are taken in groups of [`GROUP_ROWS`]; a group takes exactly the bytes its 16 GGUF rows took
//! (`16 × row_bytes`), so row `r`'s group starts where row `r` started, and rows after the last whole group (the
//! 32001st of a vocabulary of 32001) stay as they were. Within a group, the blocks go by pairs:
//!
//! ```text
//! pair p (576 bytes):  block 2p:   nibbles, 4 × 64 bytes   vector t, lane r: bytes 4t..4t+4 of row r's quants
//!                      block 2p+1: nibbles, 4 × 64 bytes
//!                      block 2p:   16 scales (f16), row 0 first
//!                      block 2p+1: 16 scales
//! ```
//!
//! so that every vector is 64-byte aligned when the group is. A row with an odd number of blocks ends with a lone
//! block: 256 bytes of nibbles and 32 of scales. The low nibble of quant byte `i` is value `i` of the block and the
//! high nibble value `i + 16`, as in GGUF; lane `r` of vector `t` thus holds values `4t..4t+4` (low nibbles) and
//! `16 + 4t..16 + 4t + 4` (high nibbles) of row `r`.
//!
//! # q4_K, 16 rows interleaved
//! A super-block of 16 rows (256 values each, 2304 bytes) is three vectors of the 6-bit scales and mins as GGUF
//! packs them (vector `i`, lane `r`: bytes `4i..4i + 4` of row `r`'s 12), the 16 `d` and the 16 `dmin`, then 32
//! vectors of quants (vector `8q + t`, lane `r`: bytes `32q + 4t..32q + 4t + 4` of row `r`'s quants, whose low
//! nibbles are values `64q + 4t..` of sub-block `2q` and whose high nibbles values `64q + 32 + 4t..` of sub-block
//! `2q + 1`).
//!
//! # q6_K, 16 rows interleaved
//! GGUF splits each 6-bit value into a nibble (`ql`) and two bits (`qh`) whose positions the kernel must shift
//! together for every value. Interleaved, the bits are placed at load so that three of every four values need one
//! `vpandq`: a super-block of 16 rows is its 16 `d` (together with the next super-block's, see below), then 256
//! bytes of scales (byte `16g + r`: scale `g` of row `r`, so a group's 16 scales are one 16-byte load to widen),
//! then for each scale group `g` (16 values) three vectors `S0, S1, S2`: lane `r` of `Sk` holds, in the low six bits
//! of its byte `i`, value `16g + 4k + i` of row `r`, and in its top two bits two bits of value `16g + 12 + i` (bits
//! `2k, 2k + 1`). So values `16g + 4k + i` are `Sk & 63`, and four times values `16g + 12 + i` are
//! `(S0 >> 4 & 12) | (S1 >> 2 & 48) | (S2 & 192)` (at most 252: still a byte for `vpdpbusd`; the kernel divides
//! that sum by 4). Super-blocks go by pairs, `d, d, body, body` (`16 · 210` bytes each, so every vector is 64-byte
//! aligned when the group is); a lone last super-block is `body, d` ([`q6_k_offsets`]).
//!
//! # q8_0, 16 rows interleaved
//! The same with 34-byte blocks: a block's quants for 16 rows are eight vectors (lane `r` of vector `t`: values
//! `4t..4t + 4` of row `r`), a pair 1088 bytes. The signed quants are stored as unsigned `q + 128`, the operand
//! `vpdpbusd` multiplies, so the kernel does not flip them at every product.

use crate::blocks::{as_blocks, as_blocks_mut, BlockQ6K, BlockQ8K, Half};
use crate::dequant::{q6k_pack_values, q6k_values};
use crate::isa::Isa;
use crate::kernels::traits;
use crate::matrix::QuantMatrix;
use crate::tuning::Tuning;
use crate::types::{GgmlType, Result, QK_K};

/// Rows interleaved together.
pub const GROUP_ROWS: usize = 16;

/// How the rows of a weight matrix are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// As in a GGUF file: row after row, each row its blocks in order.
    Ggml,
    /// q4_0, q8_0, q4_K or q6_K rows interleaved by groups of [`GROUP_ROWS`] (see the module documentation); rows after
    /// the last whole group as in `Ggml`.
    Interleaved16,
}

impl Layout {
    /// The layout whose kernels are fastest for `ty` at `isa` on this CPU: `Interleaved16` for the types the kernel
    /// table gives it with kernels at `isa` ([`traits`]: q4_0, q8_0 and q4_K on AVX2 and AVX-512) and
    /// this CPU's tuning row (or `VICUNA_KERNELS_PACK`) names ([`Tuning::pack`]); `Ggml` everywhere else.
    pub fn best(ty: GgmlType, isa: Isa) -> Layout {
        let facts = traits(ty);
        if facts.packed_isas.contains(&isa) && Tuning::get().pack.types(isa).contains(&ty) {
            facts.packed.unwrap_or(Layout::Ggml)
        } else {
            Layout::Ggml
        }
    }

    /// What `vicuna bench --json` reports.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Ggml => "ggml",
            Layout::Interleaved16 => "interleaved16",
        }
    }
}

/// A weight matrix in a layout of its own, owned (the GGUF bytes it was made from can be given back).
pub struct PackedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    layout: Layout,
    data: Pages,
    len: usize,
}

/// Bytes in memory of their own: page-aligned (so the interleaved vectors are aligned loads; a large allocation
/// from the system allocator is only 16-byte aligned, and a 64-byte load across two cache lines costs two), and on
/// Linux in transparent huge pages where the system allows them. The hardware prefetcher does not cross a page:
/// with 2 MiB pages it streams on where with 4 KiB pages it stops every 4 KiB (decoding from a memory-mapped file
/// gets only the latter).
struct Pages(memmap2::MmapMut);

impl Pages {
    /// `len` zero bytes, or `None` if the system has no memory for them.
    fn zeroed(len: usize) -> Option<Pages> {
        let map = memmap2::MmapMut::map_anon(len.max(1)).ok()?;
        // Before the first touch, so that the pages are faulted in huge; only a hint (refused where THP is off).
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some(Pages(map))
    }
}

impl PackedMatrix {
    /// `w` rewritten in [`Layout::best`] for its type on this CPU's instruction set, or `None` where that is GGUF's
    /// own layout (or the matrix has fewer rows than one group: there would be nothing to interleave).
    pub fn for_this_cpu(w: &QuantMatrix) -> Option<PackedMatrix> {
        PackedMatrix::new(w, Layout::best(w.ty(), Isa::detect()))
    }

    /// `w` (in GGUF's layout) rewritten in `layout`; `None` for `Layout::Ggml`, for a layout that is not `w`'s
    /// type's, for fewer rows than one group, for a matrix that is not in GGUF's layout (already rewritten: its
    /// bytes would be scrambled twice), or when there is no memory for the copy (GGUF's layout still works).
    pub fn new(w: &QuantMatrix, layout: Layout) -> Option<PackedMatrix> {
        let usable = traits(w.ty()).packed == Some(layout) && w.layout() == Layout::Ggml && w.rows() >= GROUP_ROWS;
        if layout == Layout::Ggml || !usable {
            return None;
        }
        let mut data = Pages::zeroed(w.data().len())?;
        let group_bytes = GROUP_ROWS * w.row_bytes();
        let grouped = w.rows() / GROUP_ROWS * group_bytes;
        for (src, dst) in w.data().chunks_exact(group_bytes).zip(data.0.chunks_exact_mut(group_bytes)) {
            match w.ty() {
                GgmlType::Q4_K => interleave_q4_k(src, w.row_bytes(), dst),
                GgmlType::Q6_K => interleave_q6_k(src, w.row_bytes(), dst),
                ty => interleave(ty, src, w.row_bytes(), dst),
            }
        }
        data.0[grouped..w.data().len()].copy_from_slice(&w.data()[grouped..]);
        Some(PackedMatrix { ty: w.ty(), rows: w.rows(), cols: w.cols(), layout, data, len: w.data().len() })
    }

    /// The matrix to multiply with.
    pub fn matrix(&self) -> QuantMatrix<'_> {
        QuantMatrix::with_layout(self.ty, self.rows, self.cols, &self.data.0[..self.len], self.layout)
            .expect("made from a valid matrix of this shape")
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.len
    }
}

/// Rows of `w` that lie in interleaved groups (0 for GGUF's layout): the rows before the first GGUF-laid row.
pub(crate) fn grouped_rows(w: &QuantMatrix) -> usize {
    match w.layout() {
        Layout::Ggml => 0,
        Layout::Interleaved16 => w.rows() / GROUP_ROWS * GROUP_ROWS,
    }
}

/// Bytes of one block's quants for the 16 rows of a group: q4_0 256 (four vectors), q8_0 512 (eight).
pub(crate) const fn quant_bytes(ty: GgmlType) -> usize {
    GROUP_ROWS * (ty.block_bytes() - 2)
}

/// Where block `j` of a group of `ty` rows with `blocks` blocks each keeps its quants and its scales (offsets from
/// the group's start): pairs of blocks, each pair its two blocks' quants and then their scales.
pub(crate) fn block_offsets(ty: GgmlType, blocks: usize, j: usize) -> (usize, usize) {
    let (pair, second) = (j / 2, j % 2);
    let in_pair = (blocks - 2 * pair).min(2);
    let base = pair * 2 * GROUP_ROWS * ty.block_bytes();
    (base + second * quant_bytes(ty), base + in_pair * quant_bytes(ty) + second * 2 * GROUP_ROWS)
}

/// What a stored quant byte is XORed with: q8_0's signed quants are stored as unsigned `q + 128` (what
/// `vpdpbusd` multiplies, so the kernel does not flip them for every product); q4_0's nibbles are unsigned already.
pub(crate) const fn stored_xor(ty: GgmlType) -> u8 {
    match ty {
        GgmlType::Q8_0 => 0x80,
        _ => 0,
    }
}

/// Writes the 16 GGUF rows `src` (of `row_bytes` each) of type `ty` interleaved into `dst`.
///
/// A model's worth of matrices is rewritten at every load, so this loop is the load time: it moves 4-byte words (one
/// row's four quant bytes, flipped as stored, go to one lane of a vector), block by block for all 16 rows, so that
/// each block's vectors are written together while the 16 rows are read as 16 forward streams.
fn interleave(ty: GgmlType, src: &[u8], row_bytes: usize, dst: &mut [u8]) {
    let (block, blocks) = (ty.block_bytes(), row_bytes / ty.block_bytes());
    let flip = u32::from_ne_bytes([stored_xor(ty); 4]);
    let rows: [&[u8]; GROUP_ROWS] = std::array::from_fn(|r| &src[r * row_bytes..(r + 1) * row_bytes]);
    for j in 0..blocks {
        let (quants_at, scales_at) = block_offsets(ty, blocks, j);
        let (head, tail) = dst.split_at_mut(scales_at);
        let (quants, scales) = (&mut head[quants_at..quants_at + quant_bytes(ty)], &mut tail[..2 * GROUP_ROWS]);
        for (r, (row, scale)) in rows.iter().zip(scales.chunks_exact_mut(2)).enumerate() {
            let b = &row[j * block..(j + 1) * block];
            scale.copy_from_slice(&b[..2]);
            for (t, four) in b[2..].chunks_exact(4).enumerate() {
                let word = u32::from_ne_bytes([four[0], four[1], four[2], four[3]]) ^ flip;
                quants[64 * t + 4 * r..64 * t + 4 * r + 4].copy_from_slice(&word.to_ne_bytes());
            }
        }
    }
}

/// Where a q4_K super-block of 16 rows keeps its parts (offsets from its start): the packed scales and mins, `d`,
/// `dmin`, the quants; and its size (16 × 144 bytes). The kernel reads them in this order, front to back: with
/// the scales after the quants, it read 2 KiB ahead and then back for every super-block, and the hardware
/// prefetcher, which follows runs in one direction, streamed 10.8 GB/s from memory against 14.2 for GGUF's layout
/// (one thread, Zen 4), although with the weights in cache it computed 59 GB/s against 21.
pub(crate) const Q4_K_SCALES: usize = 0;
pub(crate) const Q4_K_D: usize = Q4_K_SCALES + GROUP_ROWS * 12;
pub(crate) const Q4_K_DMIN: usize = Q4_K_D + 2 * GROUP_ROWS;
pub(crate) const Q4_K_QUANTS: usize = Q4_K_DMIN + 2 * GROUP_ROWS;
pub(crate) const Q4_K_GROUP_BYTES: usize = Q4_K_QUANTS + GROUP_ROWS * 128;

/// Where byte `i` of row `lane`'s q4_K super-block lies in the group's super-block (`i` in GGUF's block order: `d`,
/// `dmin`, 12 scale bytes, 128 quant bytes).
fn q4_k_position(lane: usize, i: usize) -> usize {
    match i {
        0..2 => Q4_K_D + 2 * lane + i,
        2..4 => Q4_K_DMIN + 2 * lane + i - 2,
        4..16 => Q4_K_SCALES + 64 * ((i - 4) / 4) + 4 * lane + (i - 4) % 4,
        _ => Q4_K_QUANTS + 64 * ((i - 16) / 4) + 4 * lane + (i - 16) % 4,
    }
}

/// For the interleaved q4_K kernels' mins: per activation row and super-block, its sub-block sums (each the sum of
/// two of q8_K's 16-value `bsums`) as the pairs of 16-bit values that `vpdpwssd` / `vpmaddwd` multiply with the
/// 16 rows' pairs of mins: sub-blocks 0 and 2, 1 and 3, 4 and 6, 5 and 7. `R * blocks` entries, row-major.
pub(crate) fn q4_k_min_pairs<const R: usize>(x: &[&[BlockQ8K]; R], blocks: usize) -> Vec<[i32; 4]> {
    (0..R * blocks)
        .map(|i| {
            let y = &x[i / blocks][i % blocks];
            let bsum = |s: usize| (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32) as u16 as u32;
            [(0, 2), (1, 3), (4, 6), (5, 7)].map(|(s, t)| (bsum(s) | bsum(t) << 16) as i32)
        })
        .collect()
}

/// Writes the 16 GGUF q4_K rows `src` (of `row_bytes` each) interleaved into `dst`.
///
/// As [`interleave`], by 4-byte words (the load time): after `d` and `dmin`, a row's super-block is 35 words (3 of
/// scales and mins, 32 of quants), each of which goes whole to its lane of one vector ([`q4_k_position`]).
fn interleave_q4_k(src: &[u8], row_bytes: usize, dst: &mut [u8]) {
    const BLOCK: usize = GgmlType::Q4_K.block_bytes();
    for (b, out) in dst.chunks_exact_mut(Q4_K_GROUP_BYTES).enumerate() {
        for lane in 0..GROUP_ROWS {
            let block = &src[lane * row_bytes + b * BLOCK..][..BLOCK];
            out[Q4_K_D + 2 * lane..Q4_K_D + 2 * lane + 2].copy_from_slice(&block[..2]);
            out[Q4_K_DMIN + 2 * lane..Q4_K_DMIN + 2 * lane + 2].copy_from_slice(&block[2..4]);
            for (word, four) in block[4..].chunks_exact(4).enumerate() {
                let at = q4_k_position(lane, 4 + 4 * word);
                out[at..at + 4].copy_from_slice(four);
            }
        }
    }
}

/// A q6_K super-block of 16 rows without its `d`: the scales, then the quants of its 16 scale groups.
pub(crate) const Q6_K_SCALES: usize = 0;
pub(crate) const Q6_K_QUANTS: usize = Q6_K_SCALES + GROUP_ROWS * 16;
/// Bytes of one scale group's three vectors.
pub(crate) const Q6_K_GROUP_QUANTS: usize = 3 * 64;
pub(crate) const Q6_K_BODY_BYTES: usize = Q6_K_QUANTS + 16 * Q6_K_GROUP_QUANTS;

/// Where super-block `b` of a group of q6_K rows with `blocks` super-blocks each keeps its body (scales and quants)
/// and its 16 `d` (offsets from the group's start): a pair is both `d`s, then both bodies; a lone last super-block
/// its body, then its `d`.
pub(crate) fn q6_k_offsets(blocks: usize, b: usize) -> (usize, usize) {
    let (pair, second) = (b / 2, b % 2);
    let base = pair * 2 * GROUP_ROWS * GgmlType::Q6_K.block_bytes();
    if 2 * pair + 1 < blocks {
        (base + 4 * GROUP_ROWS + second * Q6_K_BODY_BYTES, base + second * 2 * GROUP_ROWS)
    } else {
        (base, base + Q6_K_BODY_BYTES)
    }
}

/// The three stored bytes (`S0, S1, S2` of the module documentation) of values `v[4k + i]` (k = 0, 1, 2) and
/// `v[12 + i]` of one scale group `v` (16 six-bit values).
fn q6_k_stored(v: &[u8; 16], i: usize) -> [u8; 3] {
    std::array::from_fn(|k| v[4 * k + i] | (v[12 + i] >> (2 * k) & 3) << 6)
}

/// Writes the 16 GGUF q6_K rows `src` (of `row_bytes` each) interleaved into `dst`.
fn interleave_q6_k(src: &[u8], row_bytes: usize, dst: &mut [u8]) {
    const BLOCK: usize = GgmlType::Q6_K.block_bytes();
    let blocks = row_bytes / BLOCK;
    for b in 0..blocks {
        let (body, d_at) = q6_k_offsets(blocks, b);
        for lane in 0..GROUP_ROWS {
            let block: &BlockQ6K = &as_blocks(&src[lane * row_bytes + b * BLOCK..][..BLOCK]).expect("one block")[0];
            dst[d_at + 2 * lane..d_at + 2 * lane + 2].copy_from_slice(&block.d.0);
            let values = q6k_values(block);
            for g in 0..16 {
                dst[body + Q6_K_SCALES + 16 * g + lane] = block.scales[g] as u8;
                let v: &[u8; 16] = values[16 * g..16 * g + 16].try_into().expect("16 values");
                let at = body + Q6_K_QUANTS + g * Q6_K_GROUP_QUANTS + 4 * lane;
                for i in 0..4 {
                    for (k, byte) in q6_k_stored(v, i).into_iter().enumerate() {
                        dst[at + 64 * k + i] = byte;
                    }
                }
            }
        }
    }
}

/// Lane `lane`'s q6_K super-block `b` of an interleaved group, put back in GGUF's layout.
pub(crate) fn q6_k_block(group: &[u8], blocks: usize, b: usize, lane: usize) -> BlockQ6K {
    let (body, d_at) = q6_k_offsets(blocks, b);
    let mut values = [0u8; QK_K];
    for (g, v) in values.chunks_exact_mut(16).enumerate() {
        let at = body + Q6_K_QUANTS + g * Q6_K_GROUP_QUANTS + 4 * lane;
        for i in 0..4 {
            let s: [u8; 3] = std::array::from_fn(|k| group[at + 64 * k + i]);
            for k in 0..3 {
                v[4 * k + i] = s[k] & 63;
            }
            v[12 + i] = s[0] >> 6 | (s[1] >> 6) << 2 | (s[2] >> 6) << 4;
        }
    }
    let scales = std::array::from_fn(|g| group[body + Q6_K_SCALES + 16 * g + lane] as i8);
    let mut block = BlockQ6K {
        ql: [0; QK_K / 2],
        qh: [0; QK_K / 4],
        scales,
        d: Half([group[d_at + 2 * lane], group[d_at + 2 * lane + 1]]),
    };
    q6k_pack_values(&values, &mut block);
    block
}

/// Row `r` of `w` in GGUF's layout, whatever `w`'s layout (what a kernel that reads GGUF rows, or a test, needs).
pub fn ggml_row(w: &QuantMatrix, r: usize, out: &mut [u8]) -> Result<()> {
    crate::types::check_len("row buffer", w.row_bytes(), out.len())?;
    if r >= grouped_rows(w) {
        out.copy_from_slice(w.rows_data(r..r + 1));
        return Ok(());
    }
    let (block, blocks, flip) = (w.ty().block_bytes(), w.row_bytes() / w.ty().block_bytes(), stored_xor(w.ty()));
    let group = w.rows_data(r / GROUP_ROWS * GROUP_ROWS..(r / GROUP_ROWS + 1) * GROUP_ROWS);
    let lane = r % GROUP_ROWS;
    if w.ty() == GgmlType::Q6_K {
        for (b, out) in as_blocks_mut::<BlockQ6K>(out)?.iter_mut().enumerate() {
            *out = q6_k_block(group, blocks, b, lane);
        }
        return Ok(());
    }
    if w.ty() == GgmlType::Q4_K {
        for (b, out) in out.chunks_exact_mut(block).enumerate() {
            for (i, byte) in out.iter_mut().enumerate() {
                *byte = group[b * Q4_K_GROUP_BYTES + q4_k_position(lane, i)];
            }
        }
        return Ok(());
    }
    for (j, b) in out.chunks_exact_mut(block).enumerate() {
        let (quants, scales) = block_offsets(w.ty(), blocks, j);
        b[..2].copy_from_slice(&group[scales + 2 * lane..scales + 2 * lane + 2]);
        for (t, four) in b[2..].chunks_exact_mut(4).enumerate() {
            let at = quants + 64 * t + 4 * lane;
            for (d, &q) in four.iter_mut().zip(&group[at..at + 4]) {
                *d = q ^ flip;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_keeps_every_byte_and_the_offsets_tile_the_group() {
        for (ty, (rows, blocks)) in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K]
            .into_iter()
            .flat_map(|ty| [(16, 2), (33, 3), (32, 1), (17, 20), (48, 5)].map(|shape| (ty, shape)))
        {
            let row_bytes = blocks * ty.block_bytes();
            let data: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 7 + i / 13) as u8).collect();
            let w = QuantMatrix::new(ty, rows, blocks * ty.block_size(), &data).unwrap();
            let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
            let m = packed.matrix();
            assert_eq!(grouped_rows(&m), rows / 16 * 16);
            assert_ne!(m.data(), w.data(), "nothing was interleaved");
            let mut row = vec![0u8; row_bytes];
            for r in 0..rows {
                ggml_row(&m, r, &mut row).unwrap();
                assert_eq!(row, w.rows_data(r..r + 1), "row {r} of {rows}x{blocks} blocks");
            }
            if ty == GgmlType::Q4_K {
                let mut seen = vec![0u8; Q4_K_GROUP_BYTES];
                (0..16).flat_map(|lane| (0..144).map(move |i| q4_k_position(lane, i))).for_each(|at| seen[at] += 1);
                assert!(seen.iter().all(|&s| s == 1), "q4_K positions tile the super-block");
                continue;
            }
            if ty == GgmlType::Q6_K {
                // Every byte of a group is some super-block's body or `d`, exactly once, and the bodies aligned.
                let mut seen = vec![0u8; 16 * row_bytes];
                for b in 0..blocks {
                    let (body, d) = q6_k_offsets(blocks, b);
                    seen[body..body + Q6_K_BODY_BYTES].iter_mut().for_each(|s| *s += 1);
                    seen[d..d + 32].iter_mut().for_each(|s| *s += 1);
                    assert!(body % 64 == 0 || b + 1 == blocks, "body of super-block {b} of {blocks} unaligned");
                }
                assert!(seen.iter().all(|&s| s == 1), "q6_K {rows}x{blocks}");
                continue;
            }
            // Every byte of a group is some block's quant or scale, exactly once.
            let mut seen = vec![0u8; 16 * row_bytes];
            for j in 0..blocks {
                let (quants, scales) = block_offsets(ty, blocks, j);
                seen[quants..quants + quant_bytes(ty)].iter_mut().for_each(|s| *s += 1);
                seen[scales..scales + 32].iter_mut().for_each(|s| *s += 1);
                assert_eq!(quants % 64, 0, "quants of block {j} unaligned");
            }
            assert!(seen.iter().all(|&s| s == 1), "{ty} {rows}x{blocks}");
        }
    }

    #[test]
    fn only_the_types_with_kernels_and_a_whole_group_are_interleaved() {
        let data = vec![0u8; 15 * 18];
        let w = QuantMatrix::new(GgmlType::Q4_0, 15, 32, &data).unwrap();
        assert!(PackedMatrix::new(&w, Layout::Interleaved16).is_none());
        let data = vec![0u8; 16 * 176];
        let w = QuantMatrix::new(GgmlType::Q5_K, 16, 256, &data).unwrap();
        assert!(PackedMatrix::new(&w, Layout::Interleaved16).is_none());
        let data = vec![0u8; 16 * 18];
        let w = QuantMatrix::new(GgmlType::Q4_0, 16, 32, &data).unwrap();
        let packed = PackedMatrix::new(&w, Layout::Interleaved16).unwrap();
        assert!(PackedMatrix::new(&packed.matrix(), Layout::Interleaved16).is_none(), "never rewritten twice");
        assert_eq!(Layout::best(GgmlType::Q5_K, Isa::Avx512), Layout::Ggml);
        assert_eq!(Layout::best(GgmlType::Q4_0, Isa::Scalar), Layout::Ggml);
        assert_eq!(Layout::best(GgmlType::Q6_K, Isa::Avx2), Layout::Ggml, "no AVX2 kernel for interleaved q6_K");
    }
}
