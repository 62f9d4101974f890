//! The quantized CPU compute core: ggml's block formats bit for bit, their reference (de)quantizers, and
//! `y = W x` kernels (AVX-512 VNNI, AVX2, scalar) over weights borrowed in place from GGUF data.
//!
//! # Formats
//! [`GgmlType`] numbers the element types as ggml and GGUF do; [`row_size`] gives the bytes of a row. The block
//! structs ([`BlockQ4_0`], [`BlockQ8_0`], [`BlockQ4K`], [`BlockQ6K`], …) are ggml's layouts field for field, with
//! byte alignment, so [`as_blocks`] can view any byte slice (say, a memory-mapped tensor) as blocks in place.
//!
//! # Converting rows
//! * [`quantize_row`]: f32 → every type above, exactly as ggml's reference quantizers (`quantize_row_*_ref`, what
//!   `llama-quantize` runs without an importance matrix): byte for byte the same output.
//! * [`dequantize_row`]: any type → f32, bit for bit as ggml's `dequantize_row_*`.
//!
//! # Multiplying
//! [`matmul()`]`(w, x, n, out, pool)` computes `out[c][r] = Σ_k w[r][k] · x[c][k]` for a [`QuantMatrix`] `w`
//! (`rows × cols`, borrowed), `n` activation rows `x` (`n × cols` f32) and `out` (`n × rows` f32). Like ggml, it
//! first quantizes the activations: to q8_0 for q4_0/q8_0 weights, to q8_K for q4_K/q6_K. Those four types, and
//! f32/f16/bf16, have dedicated kernels; the other types are dequantized a row at a time (correct, not fast).
//!
//! * One activation row (decoding): each weight row is streamed once through a row kernel that unpacks and
//!   multiplies 64 weights per step. This is bound by memory bandwidth.
//! * A few activation rows (a server decoding several sequences in one step): multi-row kernels load and unpack
//!   each weight block once and multiply it with up to 8 activation rows, each with its own accumulators (more rows
//!   go in passes of at most 8, each over the same L2-sized piece of weights). Per activation row they do the
//!   one-row kernel's integer sums and float operations in its order, so every output is bit for bit what that row
//!   alone would give.
//! * Many activation rows on AVX-512 (prompt processing; from 11 rows for q4_0, 10 for q8_0, 14 for q4_K, 17 for
//!   q6_K, where it overtakes the multi-row kernels): chunks of 32 weight rows are unpacked once to bytes, and a
//!   register-blocked VNNI kernel multiplies them with 16 activation rows at a time.
//!
//! On every path each weight byte is read from memory once per call.
//!
//! # Layouts of its own
//! A [`PackedMatrix`] is a matrix rewritten once (a model does it at load) in a layout the kernels read with fewer
//! instructions per byte: q4_0 rows interleaved by 16 on AVX-512 ([`Layout::best`], the `packed` module), so that
//! each 32-bit lane sums one weight row. Every path takes it; results are bit for bit the scalar reference's on it. Which types have which of these kernels, and
//! from how many activation rows the GEMM takes over, is one table of per-type facts (`kernels::traits`), from which
//! [`matmul_path`] chooses a product's route in one place.
//!
//! Threads: the caller owns a rayon [`ThreadPool`] (re-exported, with [`ThreadPoolBuilder`]) and passes it in; a
//! call splits the output rows into chunks that the pool's threads take from a shared counter, and returns when
//! all are done (the `schedule` module). A one-thread pool, or a product too small to be worth waking the pool, runs
//! on the calling thread. Results never depend on the number of threads.
//!
//! # Attending
//! [`attention()`] is causal self-attention of new query rows over an f16 (or f32) key/value cache, grouped-query aware,
//! with an online softmax over key blocks (the score matrix is never built), parallel over the caller's pool.
//!
//! The instruction set is detected once ([`Isa::detect`]); [`matmul_with`] takes an explicit [`Isa`] (tests,
//! measurements). The scalar level is the reference that the others are tested against.

mod acts;
pub mod attention;
pub mod blocks;
pub mod dequant;
pub mod isa;
mod kernels;
pub mod matmul;
mod matrix;
pub mod packed;
pub mod quant;
mod schedule;
pub mod sgemm;
pub mod tuning;
pub mod types;

pub use attention::{attention, attention_with, f32_to_f16, AttentionSeq, HeadLayout, KvSlice, KvView};
pub use blocks::*;
pub use dequant::dequantize_row;
pub use isa::{amx_available, Isa};
pub use matmul::{matmul, matmul_path, matmul_with, MatmulPath, QuantMatrix};
pub use packed::{Layout, PackedMatrix};
pub use quant::quantize_row;
pub use rayon::{ThreadPool, ThreadPoolBuilder};
pub use sgemm::{sgemm, sgemm_serial, sgemm_with, MatRef};
pub use tuning::{Cpu, Pack, Prefetch, Tuning};
pub use types::{row_size, Error, GgmlType, Result, QK, QK_K};
