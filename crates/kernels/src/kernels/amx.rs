//! AMX int8 tiles (Intel Sapphire Rapids and later) for the GEMM of prompt processing: the same panel and
//! activation tiles as the AVX-512 GEMM ([`super::avx512_gemm`]), and the same arithmetic, with the integer dot
//! products of each scale group done by the tile unit instead of `vpdpbusd`.
//!
//! One `tdpbsud` multiplies 16 weight rows by 16 activation rows over one group of 32 values:
//!
//! * tile A: the 16 weight rows of the panel, signed bytes, 32 per row (the panel is row-major, rows `k + 64` apart);
//! * tile B: the group's eight runs of four values of the 16 activation rows, unsigned `x + 128`: exactly the
//!   activation tiles' layout (64 bytes per run), so they are loaded as they are;
//! * tile C: the 16 × 16 integer sums, stored and taken through the same AVX-512 scaling as the VNNI kernel's
//!   (`-128 · Σ w` added, times the activation scales, times the weight scale, accumulated in f32 per row).
//!
//! The results are bit for bit the VNNI GEMM's: the integer sums are exact either way, and the float operations
//! are the same in the same order. Two sets of tiles alternate by group, so that the tile unit works on group g + 1
//! while the vector units scale group g.
//!
//! Linux hands out tile data only to processes that ask (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`):
//! [`available`] asks once per process, before any thread uses a tile, and says no where the CPU has no AMX, the
//! kernel refuses (before Linux 5.16) or a VM does not pass XTILEDATA through; the GEMM then stays on VNNI.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::schedule::SharedOut;

/// Activation rows per tile (one per int32 column of C) and weight rows per tile (one per row of A and C).
const TILE: usize = 16;

/// Whether this process may use AMX-INT8 tiles: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and
/// 25) and Linux granted the tile data permission, requested on the first call for the whole process.
pub(crate) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        let edx = __cpuid_count(7, 0).edx;
        let cpu_has_amx = edx & (1 << 24) != 0 && edx & (1 << 25) != 0;
        // SAFETY: `request_tile_data` only makes system calls.
        cpu_has_amx && unsafe { request_tile_data() }
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, then `ARCH_GET_XCOMP_PERM` to see that it holds.
///
/// # Safety
/// Only makes the two system calls.
#[cfg(target_os = "linux")]
unsafe fn request_tile_data() -> bool {
    const ARCH_GET_XCOMP_PERM: i64 = 0x1022;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    if libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0 {
        return false;
    }
    let mut features: u64 = 0;
    libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut features as *mut u64) == 0
        && features & (1 << XFEATURE_XTILEDATA) != 0
}

#[cfg(not(target_os = "linux"))]
unsafe fn request_tile_data() -> bool {
    false
}

/// The tile configuration (palette 1): C in tiles 0 and 3 (16 rows of 16 int32), A in 1 and 4 (16 rows of
/// `group` bytes), B in 2 and 5 (`group / 4` rows of 64 bytes).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn for_group(group: usize) -> TileConfig {
        let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for set in [0, 3] {
            (config.colsb[set], config.rows[set]) = (64, TILE as u8);
            (config.colsb[set + 1], config.rows[set + 1]) = (group as u16, TILE as u8);
            (config.colsb[set + 2], config.rows[set + 2]) = (64, (group / 4) as u8);
        }
        config
    }
}

/// A chunk's weight rows unpacked for the tiles (what the GEMM's scratch holds): `q` row-major signed bytes,
/// `stride` bytes apart; per row and group `corr` (`-128 · Σ w`) and `scale` (the weight scale).
pub(crate) struct Panel<'a> {
    pub q: &'a [i8],
    pub stride: usize,
    pub corr: &'a [i32],
    pub scale: &'a [f32],
}

/// The panel's weight rows `0..rows` (a multiple of 16 at most; rows past `rows_end` are zeros and not stored) of
/// `k` values in groups of 32, against every activation tile, into `out` at weight rows `first_row..rows_end`.
///
/// `xq` and `xscale` are the activation tiles (per tile `k / 4` runs of 64 bytes, and per group a vector of 16
/// scales).
///
/// # Safety
/// [`available`] must have said yes and AVX-512 F must be available; the buffers must have the sizes above and
/// `out` must be exclusively this caller's for weight rows `first_row..rows_end`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn gemm_q8_0_groups(
    panel: Panel,
    rows: usize,
    k: usize,
    xq: &[u8],
    xscale: &[f32],
    n: usize,
    first_row: usize,
    rows_end: usize,
    out: SharedOut,
) {
    const GROUP: usize = 32;
    let Panel { q, stride, corr, scale } = panel;
    let groups = k / GROUP;
    debug_assert!(q.len() >= rows * stride && corr.len() >= rows * groups && xq.len() >= n.div_ceil(TILE) * k * 16);
    let config = TileConfig::for_group(GROUP);
    asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    // Where the tile unit stores each group's sums for the vector units: one buffer per set of tiles.
    #[repr(align(64))]
    struct Sums([[i32; TILE * TILE]; 2]);
    let mut sums = Sums([[0; TILE * TILE]; 2]);
    for tile in 0..n.div_ceil(TILE) {
        let b = xq.as_ptr().add(tile * k * 16);
        let xs = xscale.as_ptr().add(tile * groups * TILE);
        for block in (0..rows).step_by(TILE) {
            let a = q.as_ptr().add(block * stride);
            let (wcorr, wscale) = (corr.as_ptr().add(block * groups), scale.as_ptr().add(block * groups));
            let mut acc = [_mm512_setzero_ps(); TILE];
            product::<0>(a, stride, b);
            for g in 0..groups {
                if g + 1 < groups {
                    let (a, b) = (a.add((g + 1) * GROUP), b.add((g + 1) * GROUP * 16));
                    if g % 2 == 0 {
                        product::<3>(a, stride, b);
                    } else {
                        product::<0>(a, stride, b);
                    }
                }
                let buffer = &mut sums.0[g % 2];
                if g % 2 == 0 {
                    store::<0>(buffer);
                } else {
                    store::<3>(buffer);
                }
                let x_scale = _mm512_loadu_ps(xs.add(g * TILE));
                // Spelled out row by row: as a loop, the accumulators were kept on the stack.
                macro_rules! scale_rows {
                    ($($r:literal)*) => {$(
                        let sum = _mm512_add_epi32(
                            _mm512_load_si512(buffer.as_ptr().add($r * TILE).cast()),
                            _mm512_set1_epi32(*wcorr.add($r * groups + g)),
                        );
                        let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), x_scale);
                        acc[$r] = _mm512_fmadd_ps(scaled, _mm512_set1_ps(*wscale.add($r * groups + g)), acc[$r]);
                    )*};
                }
                scale_rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
            let mut lanes = [0f32; TILE];
            for (r, acc) in acc.iter().enumerate() {
                let row = first_row + block + r;
                if row >= rows_end {
                    break;
                }
                _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
                for (lane, &v) in lanes.iter().enumerate().take(n - tile * TILE) {
                    out.column(tile * TILE + lane, row..row + 1)[0] = v;
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Tile C of set `C` (0 or 3) = the 16 weight rows at `a` (`row_stride` bytes apart) · the activation runs at `b`
/// (64 bytes apart).
///
/// # Safety
/// Tiles configured by [`gemm_q8_0_groups`]; `a` and `b` readable for the tiles' rows.
#[inline(always)]
unsafe fn product<const C: usize>(a: *const i8, row_stride: usize, b: *const u8) {
    asm!(
        "tileloadd tmm{ta}, [{a} + {row_stride}*1]",
        "tileloadd tmm{tb}, [{b} + {stride}*1]",
        "tilezero tmm{c}",
        "tdpbsud tmm{c}, tmm{ta}, tmm{tb}",
        a = in(reg) a,
        row_stride = in(reg) row_stride,
        b = in(reg) b,
        stride = in(reg) 64usize,
        c = const C,
        ta = const C + 1,
        tb = const C + 2,
        options(nostack, readonly),
    );
}

/// Stores tile C of set `C` (16 rows of 16 int32) at `buffer`.
///
/// # Safety
/// Tiles configured by [`gemm_q8_0_groups`].
#[inline(always)]
unsafe fn store<const C: usize>(buffer: &mut [i32; TILE * TILE]) {
    asm!(
        "tilestored [{p} + {stride}*1], tmm{c}",
        p = in(reg) buffer.as_mut_ptr(),
        stride = in(reg) 64usize,
        c = const C,
        options(nostack),
    );
}
