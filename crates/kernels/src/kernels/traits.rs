//! One table of what the kernels offer each weight type (in the manner of ggml's `type_traits_cpu`): how its
//! activations are prepared, which kernels it has, and from how many activation rows the GEMM takes over. The
//! dispatch (`matmul_path`, [`super::rows`], [`super::rows_multi`]) asks it; nothing else decides which types have
//! fast paths.

use crate::isa::Isa;
use crate::packed::Layout;
use crate::types::{GgmlType, QK_K};

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

/// The kernel facts of one weight type (see [`traits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TypeTraits {
    /// How the activations are prepared.
    pub act: ActKind,
    /// Whether rows have a dedicated kernel ([`super::rows`]); the others are dequantized to f32 row by row.
    pub row_kernel: bool,
    /// Whether there are multi-row kernels ([`super::rows_multi`]): the quantized types with row kernels; float
    /// rows gain nothing from sharing an unpacking they do not need.
    pub multi_row_kernel: bool,
    /// From how many activation rows the AVX-512 GEMM multiplies this type rather than the multi-row kernels;
    /// `None`: there is no GEMM for it.
    pub gemm_min_rows: Option<usize>,
    /// Whether the GEMM can take the type's integer products to AMX int8 tiles ([`super::amx`]): the types with
    /// q8_0 activations, whose groups of 32 values each have both scales.
    pub amx: bool,
    /// Values per scale group: the unit whose integer sum gets one weight scale (and, in the GEMM's tiles, one
    /// activation scale); 1 for the float types.
    pub group_len: usize,
    /// The layout of its own that the type's rows are rewritten in at load, where its kernels read it with fewer
    /// instructions per byte ([`crate::packed`]); `None`: GGUF's.
    pub packed: Option<Layout>,
    /// The instruction sets with kernels for that layout (elsewhere the scalar reference would multiply it, so
    /// the rows stay in GGUF's layout: [`Layout::best`]).
    pub packed_isas: &'static [Isa],
}

/// A type whose rows are dequantized to f32 first, with a weight scale per 32 values.
const DEQUANTIZED: TypeTraits = TypeTraits {
    act: ActKind::F32,
    row_kernel: false,
    multi_row_kernel: false,
    gemm_min_rows: None,
    amx: false,
    group_len: 32,
    packed: None,
    packed_isas: &[],
};

/// A float type: row kernels on the f32 activations as given, nothing more.
const FLOAT: TypeTraits = TypeTraits { row_kernel: true, group_len: 1, ..DEQUANTIZED };

/// A quantized type with row and multi-row kernels and a GEMM (whose rows below say from how many rows).
const QUANTIZED: TypeTraits = TypeTraits { row_kernel: true, multi_row_kernel: true, ..DEQUANTIZED };

/// The kernel facts of weights of type `ty`.
///
/// Where the GEMM takes over: it computes whole tiles of 16 activation rows, so it costs nearly as much for 8 rows
/// as for 16, while the multi-row kernels cost about one more unpacked-weight dot per row. Where the two cross was
/// measured with `kernel_bench --rows` (13824x5120, weights from DRAM, one thread, Zen 4); each row's comment has
/// its figures.
pub(crate) fn traits(ty: GgmlType) -> &'static TypeTraits {
    match ty {
        // Multi-row 8.0 ms at 10 rows against the GEMM's 8.5, 8.7 against 8.3 at 11.
        GgmlType::Q4_0 => &TypeTraits {
            act: ActKind::Q8_0 { zero_point: 8 },
            gemm_min_rows: Some(11),
            amx: true,
            packed: Some(Layout::Interleaved16),
            packed_isas: &[Isa::Avx2, Isa::Avx512],
            ..QUANTIZED
        },
        // Multi-row 10.1 ms against the GEMM's 10.8 at 9 rows, 11.4 against 10.5 at 10.
        GgmlType::Q8_0 => &TypeTraits {
            act: ActKind::Q8_0 { zero_point: 128 },
            gemm_min_rows: Some(10),
            amx: true,
            packed: Some(Layout::Interleaved16),
            packed_isas: &[Isa::Avx2, Isa::Avx512],
            ..QUANTIZED
        },
        // Multi-row 8.9 ms against the GEMM's 9.3 at 13 rows, even at 14.
        GgmlType::Q4_K => &TypeTraits {
            act: ActKind::Q8K,
            gemm_min_rows: Some(14),
            packed: Some(Layout::Interleaved16),
            packed_isas: &[Isa::Avx2, Isa::Avx512],
            ..QUANTIZED
        },
        // Its GEMM is the slowest: even at 16 rows (and 11.0 ms against 12.5 at 16 on 5120x13824), so from 17,
        // where the multi-row path needs a third pass.
        GgmlType::Q6_K => &TypeTraits {
            act: ActKind::Q8K,
            gemm_min_rows: Some(17),
            group_len: 16,
            packed: Some(Layout::Interleaved16),
            packed_isas: &[Isa::Avx512],
            ..QUANTIZED
        },
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &FLOAT,
        GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => &DEQUANTIZED,
        GgmlType::Q2_K | GgmlType::Q3_K => &TypeTraits { group_len: 16, ..DEQUANTIZED },
        // Never a weight ([`crate::QuantMatrix::new`] refuses it); one scale per super-block.
        GgmlType::Q8_K => &TypeTraits { group_len: QK_K, ..DEQUANTIZED },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the table says, as the six functions it replaced answered it.
    #[test]
    fn table_rows() {
        let fast = [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];
        for ty in GgmlType::ALL {
            let t = traits(ty);
            let quantized_kernels = fast.contains(&ty);
            assert_eq!(t.multi_row_kernel, quantized_kernels, "{ty}");
            assert_eq!(t.gemm_min_rows.is_some(), quantized_kernels, "{ty}");
            assert_eq!(t.row_kernel, quantized_kernels || !ty.is_quantized(), "{ty}");
            assert_eq!(t.act == ActKind::F32, !quantized_kernels, "{ty}");
            assert_eq!(t.amx, matches!(t.act, ActKind::Q8_0 { .. }), "{ty}");
        }
        assert_eq!(traits(GgmlType::Q4_0).act, ActKind::Q8_0 { zero_point: 8 });
        assert_eq!(traits(GgmlType::Q8_0).act, ActKind::Q8_0 { zero_point: 128 });
        assert_eq!(traits(GgmlType::Q6_K).group_len, 16);
        assert_eq!(traits(GgmlType::Q4_K).group_len, 32);
    }
}
