//! Row kernels (`out[i] = dot(weight row i, x)` for one activation row) and multi-row kernels (the same for a few
//! activation rows at once, each weight block unpacked once) at each instruction-set level, and the choice between
//! them; `avx512_gemm` has the kernel for many activation rows at once. Which weight types have which kernels is
//! the table in `traits`.

use crate::acts::{ActsQ8K, ActsQ8_0, Q8_0Row};
use crate::blocks::BlockQ8K;
use crate::isa::Isa;
use crate::packed::Layout;
#[cfg(target_arch = "x86_64")]
use crate::tuning::{Prefetch, Tuning, PREFETCH_NTA, PREFETCH_OFF, PREFETCH_T0};
use crate::types::GgmlType;

/// Calls the kernel `path[generics](args)` instantiated for this process's prefetch hint ([`Tuning::prefetch`]),
/// the kernel's last const parameter.
#[cfg(target_arch = "x86_64")]
macro_rules! with_prefetch {
    ($($f:ident)::+ [$($g:tt),*] ($($arg:expr),*)) => {
        with_prefetch!(Tuning::get().prefetch; $($f)::+ [$($g),*] ($($arg),*))
    };
    ($hint:expr; $($f:ident)::+ [$($g:tt),*] ($($arg:expr),*)) => {
        match $hint {
            Prefetch::Nta => $($f)::+::<$($g,)* PREFETCH_NTA>($($arg),*),
            Prefetch::T0 => $($f)::+::<$($g,)* PREFETCH_T0>($($arg),*),
            Prefetch::Off => $($f)::+::<$($g,)* PREFETCH_OFF>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_multi;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_packed;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_gemm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_multi;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_packed;
pub(crate) mod scalar;
mod traits;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub(crate) use traits::{traits, ActKind};

/// All activation rows of one matmul, prepared once.
pub(crate) enum Activations<'a> {
    Q8_0(ActsQ8_0),
    Q8K(ActsQ8K),
    F32 { x: &'a [f32], k: usize },
}

/// One activation row.
#[derive(Clone, Copy)]
pub(crate) enum ActRow<'a> {
    Q8_0(Q8_0Row<'a>),
    Q8K(&'a [BlockQ8K]),
    F32(&'a [f32]),
}

impl<'a> Activations<'a> {
    pub fn new(kind: ActKind, x: &'a [f32], n: usize, k: usize, isa: Isa) -> Activations<'a> {
        match kind {
            ActKind::Q8_0 { zero_point } => Activations::Q8_0(ActsQ8_0::new(x, n, k, zero_point, isa)),
            ActKind::Q8K => Activations::Q8K(ActsQ8K::new(x, n, k, isa)),
            ActKind::F32 => Activations::F32 { x, k },
        }
    }

    pub fn row(&self, c: usize) -> ActRow<'_> {
        match self {
            Activations::Q8_0(acts) => ActRow::Q8_0(acts.row(c)),
            Activations::Q8K(acts) => ActRow::Q8K(acts.row(c)),
            Activations::F32 { x, k } => ActRow::F32(&x[c * k..(c + 1) * k]),
        }
    }
}

/// `out[i] = dot(row i of w, x)` for the rows in `w` (whole rows of `row_bytes` bytes, of a type with a row kernel:
/// `TypeTraits::row_kernel`).
///
/// `isa` must be available on this CPU (checked by the public entry points).
pub(crate) fn rows(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: ActRow, out: &mut [f32]) {
    debug_assert_eq!(w.len(), out.len() * row_bytes);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was checked against the CPU; the kernels read exactly the rows in `w` and the activation row.
    unsafe {
        match (isa, ty, x) {
            (Isa::Avx512, GgmlType::Q4_0, ActRow::Q8_0(x)) => {
                return with_prefetch!(avx512::rows_q4_0[](w, row_bytes, x, out))
            }
            (Isa::Avx512, GgmlType::Q8_0, ActRow::Q8_0(x)) => {
                return with_prefetch!(avx512::rows_q8_0[](w, row_bytes, x, out))
            }
            (Isa::Avx512, GgmlType::Q4_K, ActRow::Q8K(x)) => {
                return with_prefetch!(avx512::rows_q4_k[](w, row_bytes, x, out))
            }
            (Isa::Avx512, GgmlType::Q6_K, ActRow::Q8K(x)) => {
                return with_prefetch!(avx512::rows_q6_k[](w, row_bytes, x, out))
            }
            (Isa::Avx512, GgmlType::F32, ActRow::F32(x)) => return avx512::rows_f32(w, row_bytes, x, out),
            (Isa::Avx512, GgmlType::F16, ActRow::F32(x)) => return avx512::rows_f16(w, row_bytes, x, out),
            (Isa::Avx512, GgmlType::BF16, ActRow::F32(x)) => return avx512::rows_bf16(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::Q4_0, ActRow::Q8_0(x)) => return avx2::rows_q4_0(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::Q8_0, ActRow::Q8_0(x)) => return avx2::rows_q8_0(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::Q4_K, ActRow::Q8K(x)) => return avx2::rows_q4_k(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::Q6_K, ActRow::Q8K(x)) => return avx2::rows_q6_k(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::F32, ActRow::F32(x)) => return avx2::rows_f32(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::F16, ActRow::F32(x)) => return avx2::rows_f16(w, row_bytes, x, out),
            (Isa::Avx2, GgmlType::BF16, ActRow::F32(x)) => return avx2::rows_bf16(w, row_bytes, x, out),
            _ => {}
        }
    }
    match (ty, x) {
        (GgmlType::Q4_0, ActRow::Q8_0(x)) => scalar::rows_q4_0(w, row_bytes, x, out),
        (GgmlType::Q8_0, ActRow::Q8_0(x)) => scalar::rows_q8_0(w, row_bytes, x, out),
        (GgmlType::Q4_K, ActRow::Q8K(x)) => scalar::rows_q4_k(w, row_bytes, x, out),
        (GgmlType::Q6_K, ActRow::Q8K(x)) => scalar::rows_q6_k(w, row_bytes, x, out),
        (GgmlType::F32, ActRow::F32(x)) => scalar::rows_f32(w, row_bytes, x, out),
        (GgmlType::F16, ActRow::F32(x)) => scalar::rows_f16(w, row_bytes, x, out),
        (GgmlType::BF16, ActRow::F32(x)) => scalar::rows_bf16(w, row_bytes, x, out),
        _ => unreachable!("no row kernel for {ty} with these activations"),
    }
}

/// The most activation rows one multi-row kernel call takes; more are multiplied in passes of at most this many,
/// each pass over the same L2-sized piece of weights.
///
/// Each activation row needs its own accumulators, and the unpacked weights stay live while all rows use them: 8
/// rows still fit AVX-512's 32 registers. Against passes of at most 4 rows (kernel_bench `--rows`, 13824x5120,
/// weights from DRAM, one thread, Zen 4), one pass of up to 8 took q4_0 6 rows in 4.2 ms instead of 4.9, 7 in 5.1
/// instead of 5.7, 8 in 6.3 instead of 6.6; q4_K 4.0 instead of 4.5, 4.3 instead of 5.1, 4.9 instead of 6.2. (Past
/// 4 rows each further q4_0 row costs about twice as much, as the activations of 8 rows at k = 5120, 51 KB in q4_0's
/// layouts, outgrow L1; one pass still beats two.)
pub(crate) const MAX_MULTI_ROWS: usize = 8;

/// `out[c][i] = dot(row i of w, x[c])` for `x.len()` activation rows (at most [`MAX_MULTI_ROWS`]) and the rows in
/// `w` (a type with a row kernel): each result is bit for bit what [`rows`] gives for `x[c]` alone.
///
/// The SIMD levels load and unpack each weight block once for all activation rows. The scalar level, the reference,
/// runs [`rows`] per activation row: its multi-row result is by definition the one-row result.
pub(crate) fn rows_multi(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: &[ActRow], out: &mut [&mut [f32]]) {
    debug_assert!(x.len() <= MAX_MULTI_ROWS && out.len() == x.len());
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && traits(ty).multi_row_kernel {
        // SAFETY: `isa` was checked against the CPU; the kernels read exactly the rows in `w` and the activations.
        let done = unsafe {
            match x.len() {
                2 => multi::<2>(isa, ty, w, row_bytes, x, out),
                3 => multi::<3>(isa, ty, w, row_bytes, x, out),
                4 => multi::<4>(isa, ty, w, row_bytes, x, out),
                5 => multi::<5>(isa, ty, w, row_bytes, x, out),
                6 => multi::<6>(isa, ty, w, row_bytes, x, out),
                7 => multi::<7>(isa, ty, w, row_bytes, x, out),
                8 => multi::<8>(isa, ty, w, row_bytes, x, out),
                _ => false,
            }
        };
        if done {
            return;
        }
    }
    for (&x, out) in x.iter().zip(out) {
        rows(isa, ty, w, row_bytes, x, out);
    }
}

/// The multi-row kernel for `R` activation rows at `isa` (AVX2 or AVX-512), if there is one for these activations:
/// the AVX-512 q4_0 kernel needs them in the quad layout too (`Q8_0Row::natural`).
///
/// # Safety
/// `isa` must be available on this CPU.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn multi<const R: usize>(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[ActRow],
    out: &mut [&mut [f32]],
) -> bool {
    match x[0] {
        ActRow::Q8_0(_) => {
            let x: [Q8_0Row; R] = std::array::from_fn(|c| match x[c] {
                ActRow::Q8_0(x) => x,
                _ => unreachable!("activation rows of one kind"),
            });
            match (isa, ty) {
                (Isa::Avx512, GgmlType::Q4_0) if x.iter().all(|x| !x.natural.is_empty()) => {
                    with_prefetch!(avx512_multi::rows_q4_0[R](w, row_bytes, &x, out))
                }
                (Isa::Avx512, GgmlType::Q8_0) => with_prefetch!(avx512_multi::rows_q8_0[R](w, row_bytes, &x, out)),
                (Isa::Avx2, GgmlType::Q4_0) => avx2_multi::rows_q4_0(w, row_bytes, &x, out),
                (Isa::Avx2, GgmlType::Q8_0) => avx2_multi::rows_q8_0(w, row_bytes, &x, out),
                _ => return false,
            }
        }
        ActRow::Q8K(_) => {
            let x: [&[BlockQ8K]; R] = std::array::from_fn(|c| match x[c] {
                ActRow::Q8K(x) => x,
                _ => unreachable!("activation rows of one kind"),
            });
            match (isa, ty) {
                (Isa::Avx512, GgmlType::Q4_K) => with_prefetch!(avx512_multi::rows_q4_k[R](w, row_bytes, &x, out)),
                (Isa::Avx512, GgmlType::Q6_K) => with_prefetch!(avx512_multi::rows_q6_k[R](w, row_bytes, &x, out)),
                (Isa::Avx2, GgmlType::Q4_K) => avx2_multi::rows_q4_k(w, row_bytes, &x, out),
                (Isa::Avx2, GgmlType::Q6_K) => avx2_multi::rows_q6_k(w, row_bytes, &x, out),
                _ => return false,
            }
        }
        ActRow::F32(_) => return false,
    }
    true
}

/// `out[c][i] = dot(row i of w, x[c])` for the whole groups of rows of a matrix in one of the kernels' own layouts
/// (`w`: those groups' bytes, `row_bytes` per row as in GGUF) and `x.len()` activation rows (at most
/// [`MAX_MULTI_ROWS`]): each result is bit for bit what the scalar reference gives for that row alone.
pub(crate) fn groups(
    isa: Isa,
    layout: Layout,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[ActRow],
    out: &mut [&mut [f32]],
) {
    debug_assert!(x.len() <= MAX_MULTI_ROWS && out.len() == x.len());
    fn q8_0<'x>(x: &ActRow<'x>) -> Q8_0Row<'x> {
        match *x {
            ActRow::Q8_0(x) => x,
            _ => unreachable!("interleaved q4_0 and q8_0 take q8_0 activations"),
        }
    }
    fn q8k<'x>(x: &ActRow<'x>) -> &'x [BlockQ8K] {
        match *x {
            ActRow::Q8K(x) => x,
            _ => unreachable!("interleaved q4_K and q6_K take q8_K activations"),
        }
    }
    #[cfg(target_arch = "x86_64")]
    if layout == Layout::Interleaved16 && traits(ty).packed_isas.contains(&isa) {
        let hint = Tuning::get().packed_prefetch;
        macro_rules! call {
            ($r:literal) => {{
                // SAFETY: `isa` was checked against the CPU; `w` is whole groups and each `out[c]` one output per row.
                unsafe {
                    if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
                        let x: [&[BlockQ8K]; $r] = std::array::from_fn(|c| q8k(&x[c]));
                        match (isa, ty) {
                            (Isa::Avx512, GgmlType::Q4_K) => {
                                with_prefetch!(hint; avx512_packed::groups_q4_k[$r](w, row_bytes, &x, out))
                            }
                            (Isa::Avx512, GgmlType::Q6_K) => {
                                with_prefetch!(hint; avx512_packed::groups_q6_k[$r](w, row_bytes, &x, out))
                            }
                            (_, GgmlType::Q4_K) => {
                                with_prefetch!(hint; avx2_packed::groups_q4_k[$r](w, row_bytes, &x, out))
                            }
                            _ => unreachable!("no kernel for {ty} in {layout:?} at {isa:?}"),
                        }
                    } else {
                        let x: [Q8_0Row; $r] = std::array::from_fn(|c| q8_0(&x[c]));
                        match (isa, ty) {
                            (Isa::Avx512, GgmlType::Q4_0) => {
                                with_prefetch!(hint; avx512_packed::groups_q4_0[$r](w, row_bytes, &x, out))
                            }
                            (Isa::Avx512, GgmlType::Q8_0) => {
                                with_prefetch!(hint; avx512_packed::groups_q8_0[$r](w, row_bytes, &x, out))
                            }
                            (_, GgmlType::Q4_0) => {
                                with_prefetch!(hint; avx2_packed::groups_q4_0[$r](w, row_bytes, &x, out))
                            }
                            (_, GgmlType::Q8_0) => {
                                with_prefetch!(hint; avx2_packed::groups_q8_0[$r](w, row_bytes, &x, out))
                            }
                            _ => unreachable!("no kernel for {ty} in {layout:?}"),
                        }
                    }
                }
            }};
        }
        return match x.len() {
            1 => call!(1),
            2 => call!(2),
            3 => call!(3),
            4 => call!(4),
            5 => call!(5),
            6 => call!(6),
            7 => call!(7),
            8 => call!(8),
            _ => {}
        };
    }
    let _ = isa;
    for (x, out) in x.iter().zip(out) {
        match (layout, ty) {
            (Layout::Interleaved16, GgmlType::Q4_0 | GgmlType::Q8_0) => scalar::groups(ty, w, row_bytes, q8_0(x), out),
            (Layout::Interleaved16, GgmlType::Q4_K) => scalar::groups_q4_k(w, row_bytes, q8k(x), out),
            (Layout::Interleaved16, GgmlType::Q6_K) => scalar::groups_q6_k(w, row_bytes, q8k(x), out),
            _ => unreachable!("no kernel for {ty} in {layout:?}"),
        }
    }
}
