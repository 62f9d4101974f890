//! Row kernels (`out[i] = dot(weight row i, x)` for one activation row) at each instruction-set level, and the
//! choice between them; `avx512_gemm` has the kernel for many activation rows at once.

use crate::acts::{ActsQ8K, ActsQ8_0, Q8_0Row};
use crate::blocks::BlockQ8K;
use crate::isa::Isa;
use crate::types::GgmlType;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512_gemm;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// How the activations are prepared for a weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    /// q8_0, for weights stored as unsigned bytes `q + zero_point` with one scale per 32 (q4_0: 8, q8_0: 128).
    Q8_0 { zero_point: i32 },
    /// q8_K, for the k-quants with a dedicated kernel.
    Q8K,
    /// f32 as given: for f32/f16/bf16 rows, and for the types without a dedicated kernel, whose rows are
    /// dequantized to f32 first.
    F32,
}

impl ActKind {
    pub fn for_weights(ty: GgmlType) -> ActKind {
        match ty {
            GgmlType::Q4_0 => ActKind::Q8_0 { zero_point: 8 },
            GgmlType::Q8_0 => ActKind::Q8_0 { zero_point: 128 },
            GgmlType::Q4_K | GgmlType::Q6_K => ActKind::Q8K,
            _ => ActKind::F32,
        }
    }
}

/// Whether rows of `ty` have a dedicated kernel; the others are dequantized to f32 row by row.
pub(crate) fn has_row_kernel(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q8_0
            | GgmlType::Q4_K
            | GgmlType::Q6_K
            | GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
    )
}

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

/// `out[i] = dot(row i of w, x)` for the rows in `w` (whole rows of `row_bytes` bytes, of a type with a row kernel).
///
/// `isa` must be available on this CPU (checked by the public entry points).
pub(crate) fn rows(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: ActRow, out: &mut [f32]) {
    debug_assert_eq!(w.len(), out.len() * row_bytes);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` was checked against the CPU; the kernels read exactly the rows in `w` and the activation row.
    unsafe {
        match (isa, ty, x) {
            (Isa::Avx512, GgmlType::Q4_0, ActRow::Q8_0(x)) => return avx512::rows_q4_0(w, row_bytes, x, out),
            (Isa::Avx512, GgmlType::Q8_0, ActRow::Q8_0(x)) => return avx512::rows_q8_0(w, row_bytes, x, out),
            (Isa::Avx512, GgmlType::Q4_K, ActRow::Q8K(x)) => return avx512::rows_q4_k(w, row_bytes, x, out),
            (Isa::Avx512, GgmlType::Q6_K, ActRow::Q8K(x)) => return avx512::rows_q6_k(w, row_bytes, x, out),
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
