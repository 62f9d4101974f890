//! The LLaMA forward pass on quantized weights, with this workspace's own CPU kernels (`vicuna-kernels`).
//!
//! Weights are GGUF tensors (f32, f16, bf16, q4_0, q8_0, q4_K, q6_K, … any type the kernels know) borrowed from a
//! [`TensorSource`], typically a memory-mapped GGUF file, used in place; only where the kernels read another layout
//! faster on this CPU (q4_0 on AVX-512: rows interleaved by 16, `vicuna_kernels::PackedMatrix`) is a matrix rewritten
//! once at load, and the source's pages of it given back, so a weight is never held twice. As in GGUF, the q
//! and k projections have their rows in the interleaved (Meta) RoPE order, so RoPE rotates adjacent pairs.
//!
//! One step ([`QuantLlama::forward_ragged`]) takes several sequences, each with its own [`QuantCache`] and any
//! number of new tokens. Their rows are stacked, so every weight matrix is read from memory once per step for all
//! rows; only attention runs per sequence. The step reads top to bottom like llama2.c's `forward`:
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     xb = rmsnorm(x)                   q, k, v = xb·Wqᵀ, xb·Wkᵀ, xb·Wvᵀ     rope(q, k)
//!     cache += (k, v)                   att = attention(q, cache)          x += att·Woᵀ
//!     xb = rmsnorm(x)                   x += (silu(xb·Wgateᵀ) * xb·Wupᵀ)·Wdownᵀ
//! logits = rmsnorm(x)·Woutputᵀ
//! ```
//!
//! Matrix products are `vicuna_kernels::matmul` (activations quantized as ggml does: q8_0 for q4_0/q8_0 weights,
//! q8_K for the k-quants), attention is `vicuna_kernels::attention` (online softmax over key blocks); both run on the
//! model's own rayon pool. Norms, SiLU and residuals are plain f32 loops: O(hidden) per row. The cache holds keys
//! and values in f16 for quantized models (llama.cpp's default) and in f32 for float ones ([`KvType`]).

mod cache;
mod load;
mod lora;
mod prefix;
mod source;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use vicuna_kernels::{
    attention, dequantize_row, matmul, row_size, AttentionSeq, GgmlType, HeadLayout, KvView, Layout, PackedMatrix,
    QuantMatrix, ThreadPool, ThreadPoolBuilder,
};
use vicuna_weights::LlamaConfig;

use crate::{Error, Result};
use lora::Projection;

pub use cache::{BlockShape, Counts, KvBlock, KvPool, KvType, QuantCache, Reservation, BLOCK_TOKENS};
pub use lora::{LoraAdapter, PROJECTIONS};
pub use prefix::{CachedPrefix, PrefixCache, PrefixStats};
pub use source::{OwnedTensors, TensorRef, TensorSource};

/// LLaMA over GGUF tensors, computing on a thread pool of its own. Steps of one model run one at a time (they
/// share its work buffers and threads); concurrent callers wait for each other.
pub struct QuantLlama {
    config: LlamaConfig,
    source: Arc<dyn TensorSource>,
    pool: ThreadPool,
    token_embd: Matrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `output.weight`, or `token_embd.weight` when the file has no separate output matrix (tied embeddings).
    output: Matrix,
    /// `theta^(-2i/head_dim)` for each rotated pair `i`.
    rope_freqs: Vec<f64>,
    /// What the caches store keys and values as.
    kv_type: KvType,
    /// The LoRA adapter of the caches [`QuantLlama::new_cache`] makes (`--lora DIR` of the one-off commands).
    lora: Option<Arc<LoraAdapter>>,
    /// Work buffers, reused from step to step.
    buffers: Mutex<Buffers>,
}

/// A weight matrix in the source: its name and the shape checked when the model was built. The bytes are looked
/// up for each use, so the model borrows them only while it computes; or, where the kernels have a faster layout
/// on this CPU, rewritten in it once when the model is built (`packed`), and the source's pages given back.
struct Matrix {
    name: String,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    packed: Option<PackedMatrix>,
}

impl Matrix {
    /// Rewrites the matrix in the layout this CPU's kernels read fastest ([`Layout::best`]), if that is not GGUF's.
    fn pack(&mut self, source: &dyn TensorSource) {
        let Some(tensor) = source.tensor(&self.name) else { return };
        let Ok(w) = QuantMatrix::new(self.ty, self.rows, self.cols, tensor.data) else { return };
        self.packed = PackedMatrix::for_this_cpu(&w);
        if self.packed.is_some() {
            source.release(tensor.data);
        }
    }

    fn layout(&self) -> Layout {
        self.packed.as_ref().map_or(Layout::Ggml, PackedMatrix::layout)
    }
}

/// One decoder layer. The norm weights are tiny (`hidden` values) and are kept widened to f32.
struct Layer {
    attn_norm: Vec<f32>,
    attn_q: Matrix,
    attn_k: Matrix,
    attn_v: Matrix,
    attn_output: Matrix,
    ffn_norm: Vec<f32>,
    ffn_gate: Matrix,
    ffn_up: Matrix,
    ffn_down: Matrix,
}

impl Layer {
    fn matrices_mut(&mut self) -> [&mut Matrix; 7] {
        let Layer { attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, .. } = self;
        [attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down]
    }
}

/// Activations of one step, `rows × width` each.
#[derive(Default)]
struct Buffers {
    /// The residual stream, `rows × hidden`.
    x: Vec<f32>,
    /// Normalized input of a block, then its output: `rows × hidden`.
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, `rows × q_dim`.
    att: Vec<f32>,
    /// Feed-forward hidden, `rows × intermediate`: gate (then silu(gate)·up), and up.
    hb: Vec<f32>,
    hb2: Vec<f32>,
}

impl QuantLlama {
    /// Checks every tensor the config calls for (present, shape, type, byte length), reporting all problems at
    /// once, and builds a pool of `threads` threads.
    ///
    /// The key/value cache is f16 (as llama.cpp keeps it) when the k and v projections are quantized, and f32
    /// when they are stored as floats: a float model is a reference, and f16 keys would cost it ~1e-3 in logits.
    pub fn new(config: LlamaConfig, source: Arc<dyn TensorSource>, threads: usize) -> Result<Self> {
        Self::with_kv_type(config, source, threads, None)
    }

    /// [`QuantLlama::new`] with the cache's element type chosen (`None`: as `new` chooses).
    pub fn with_kv_type(
        config: LlamaConfig,
        source: Arc<dyn TensorSource>,
        threads: usize,
        kv_type: Option<KvType>,
    ) -> Result<Self> {
        let mut problems = config_problems(&config);
        if !problems.is_empty() {
            return Err(Error::msg(format!("unsupported model config: {}", problems.join("; "))));
        }
        let (h, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let q_dim = config.num_attention_heads * config.head_dim;
        let kv_dim = config.num_key_value_heads * config.head_dim;
        let mut checker = Checker { source: &*source, problems: &mut problems };

        let token_embd = checker.matrix("token_embd.weight", vocab, h);
        let layers: Vec<Layer> = (0..config.num_hidden_layers)
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}.weight");
                Layer {
                    attn_norm: checker.vector(&name("attn_norm"), h),
                    attn_q: checker.matrix(&name("attn_q"), q_dim, h),
                    attn_k: checker.matrix(&name("attn_k"), kv_dim, h),
                    attn_v: checker.matrix(&name("attn_v"), kv_dim, h),
                    attn_output: checker.matrix(&name("attn_output"), h, q_dim),
                    ffn_norm: checker.vector(&name("ffn_norm"), h),
                    ffn_gate: checker.matrix(&name("ffn_gate"), inter, h),
                    ffn_up: checker.matrix(&name("ffn_up"), inter, h),
                    ffn_down: checker.matrix(&name("ffn_down"), h, inter),
                }
            })
            .collect();
        let output_norm = checker.vector("output_norm.weight", h);
        let tied = checker.source.tensor("output.weight").is_none();
        let mut output = checker.matrix(if tied { "token_embd.weight" } else { "output.weight" }, vocab, h);
        if !problems.is_empty() {
            let count = problems.len();
            return Err(Error::msg(format!("{count} problem(s) with the weights: {}", problems.join("; "))));
        }

        let pool = ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("vicuna-native-{i}"))
            .build()
            .map_err(|e| Error::msg(format!("cannot start {threads} compute threads: {e}")))?;
        // The matrices that only ever multiply (not the embedding table, which is read a row at a time in GGUF's
        // layout, nor the output matrix when it is that table), rewritten on all threads.
        let mut layers = layers;
        let mut matrices: Vec<&mut Matrix> = layers.iter_mut().flat_map(Layer::matrices_mut).collect();
        if !tied {
            matrices.push(&mut output);
        }
        pool.install(|| matrices.into_par_iter().for_each(|m| m.pack(&*source)));
        let float_kv = layers.iter().all(|l| [l.attn_k.ty, l.attn_v.ty].iter().all(|ty| !ty.is_quantized()));
        let kv_type = kv_type.unwrap_or(if float_kv { KvType::F32 } else { KvType::F16 });
        let half = config.head_dim / 2;
        let rope_freqs =
            (0..half).map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / config.head_dim as f64)).collect();
        Ok(QuantLlama {
            config,
            source,
            pool,
            token_embd,
            layers,
            output_norm,
            output,
            rope_freqs,
            kv_type,
            lora: None,
            buffers: Mutex::new(Buffers::default()),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Threads the model computes on.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Bytes of weight data one decoding step reads: every layer matrix and the output matrix once (the embedding
    /// table only a row per token).
    pub fn weight_bytes_per_step(&self) -> usize {
        let bytes = |m: &Matrix| m.rows * row_size(m.ty, m.cols).expect("checked in new");
        self.layer_matrices().map(bytes).sum::<usize>() + bytes(&self.output)
    }

    /// Weights of the decoder layers' matrices: a row through the stack costs twice as many flops.
    pub fn layer_parameters(&self) -> usize {
        self.layer_matrices().map(|m| m.rows * m.cols).sum()
    }

    /// How many weight matrices of each type are in each layout (`"q4_0 interleaved16"`, `"q6_K ggml"` …): the
    /// kernels' layouts chosen for this CPU, as `vicuna bench --json` reports them.
    pub fn layouts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for m in self.layer_matrices().chain([&self.output]) {
            *counts.entry(format!("{} {}", m.ty, m.layout().name())).or_insert(0) += 1;
        }
        counts
    }

    fn layer_matrices(&self) -> impl Iterator<Item = &Matrix> {
        self.layers
            .iter()
            .flat_map(|l| [&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down])
    }

    /// Bytes one position takes in a cache: keys and values of every layer.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.block_shape().bytes() / BLOCK_TOKENS
    }

    /// What this model's KV-cache blocks hold.
    pub fn block_shape(&self) -> BlockShape {
        BlockShape { layers: self.config.num_hidden_layers, kv_dim: self.kv_dim(), kv_type: self.kv_type }
    }

    /// A pool of KV-cache blocks for this model, with a budget of `capacity` blocks (`None`: no budget).
    pub fn new_pool(&self, capacity: Option<usize>) -> KvPool {
        KvPool::new(self.block_shape(), capacity)
    }

    /// An empty cache for one sequence, in a pool of its own without a budget, running the adapter of
    /// [`QuantLlama::set_lora`] if any.
    pub fn new_cache(&self) -> QuantCache {
        QuantCache::unbounded(self.block_shape()).with_lora(self.lora.clone())
    }

    /// Reads a PEFT adapter folder, checked against this model's shapes.
    pub fn load_lora(&self, dir: &std::path::Path) -> Result<LoraAdapter> {
        LoraAdapter::load(dir, &self.config)
    }

    /// The adapter that caches from [`QuantLlama::new_cache`] run with (`None`: the base model). The serving
    /// scheduler gives each sequence its own instead ([`QuantCache::with_lora`]).
    pub fn set_lora(&mut self, lora: Option<Arc<LoraAdapter>>) -> Result<()> {
        if let Some(adapter) = &lora {
            self.check_lora(adapter)?;
        }
        self.lora = lora;
        Ok(())
    }

    fn check_lora(&self, adapter: &LoraAdapter) -> Result<()> {
        if !adapter.fits(&self.config) {
            return Err(Error::msg("this LoRA adapter was checked against a model of another shape"));
        }
        Ok(())
    }

    /// Every id must index the embedding table; a bad id is the caller's input error.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        crate::check_ids(ids, self.config.vocab_size)
    }

    /// Logits of the last position only: the decoding step of one sequence.
    pub fn next_token_logits(&self, ids: &[u32], cache: &mut QuantCache) -> Result<Vec<f32>> {
        let mut logits = self.forward_ragged(&mut [(ids, cache)])?;
        Ok(logits.pop().expect("one sequence in, one out"))
    }

    /// One step for several sequences, each with its own cache and any number of new tokens (a decoding step is 1,
    /// a prompt chunk more). Every weight is read once for all rows. Returns each sequence's last-position logits.
    pub fn forward_ragged(&self, sequences: &mut [(&[u32], &mut QuantCache)]) -> Result<Vec<Vec<f32>>> {
        self.forward_ragged_rows(sequences, &vec![false; sequences.len()])
    }

    /// [`QuantLlama::forward_ragged`], where each sequence whose `every_row` is true gets the logits of all its new
    /// positions (`ids.len() × vocab`, row-major: what scoring a prompt inside a batch needs), the others only their
    /// last position's.
    pub fn forward_ragged_rows(
        &self,
        sequences: &mut [(&[u32], &mut QuantCache)],
        every_row: &[bool],
    ) -> Result<Vec<Vec<f32>>> {
        assert_eq!(sequences.len(), every_row.len(), "one flag per sequence");
        let mut buffers = self.buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let b = &mut *buffers;
        self.decoder(sequences, b)?;
        // Only the rows asked for go through the (large) output matrix.
        let h = self.config.hidden_size;
        let mut rows = Vec::with_capacity(sequences.len() * h);
        let mut counts = Vec::with_capacity(sequences.len());
        let mut end = 0;
        for ((ids, _), &all) in sequences.iter().zip(every_row) {
            let start = end;
            end += ids.len();
            let first = if all { start } else { end - 1 };
            rows.extend_from_slice(&b.xb[first * h..end * h]);
            counts.push(end - first);
        }
        let vocab = self.config.vocab_size;
        let logits = self.logits(&rows, rows.len() / h)?;
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0;
        for count in counts {
            out.push(logits[at * vocab..(at + count) * vocab].to_vec());
            at += count;
        }
        Ok(out)
    }

    /// Logits of every new position, `ids.len() × vocab` row-major (perplexity, scoring).
    pub fn forward_all(&self, ids: &[u32], cache: &mut QuantCache) -> Result<Vec<f32>> {
        let mut buffers = self.buffers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let b = &mut *buffers;
        self.decoder(&mut [(ids, cache)], b)?;
        self.logits(&b.xb, ids.len())
    }

    fn kv_dim(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    fn heads(&self) -> HeadLayout {
        let c = &self.config;
        HeadLayout { n_heads: c.num_attention_heads, n_kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }

    /// The decoder stack over the stacked rows of all sequences; leaves the final normalized hidden states in
    /// `b.xb` (`rows × hidden`) and the new positions in the caches.
    fn decoder(&self, sequences: &mut [(&[u32], &mut QuantCache)], b: &mut Buffers) -> Result<()> {
        let c = &self.config;
        for (ids, cache) in sequences.iter_mut() {
            self.check_ids(ids)?;
            if !cache.fits(self.block_shape()) {
                return Err(Error::msg("this cache was made by a model of another shape"));
            }
            let total = cache.len() + ids.len();
            if total > c.max_position_embeddings {
                return Err(Error::msg(format!(
                    "sequence of {total} tokens exceeds the model's context of {} (max_position_embeddings)",
                    c.max_position_embeddings
                )));
            }
            cache.rollback();
            cache.prepare(ids.len())?;
        }
        let (h, eps) = (c.hidden_size, c.rms_norm_eps as f32);
        let tokens: Vec<u32> = sequences.iter().flat_map(|(ids, _)| ids.iter().copied()).collect();
        let positions: Vec<usize> =
            sequences.iter().flat_map(|(ids, cache)| cache.len()..cache.len() + ids.len()).collect();
        let turns = self.rope_turns(&positions);
        let n = tokens.len();
        let adapted = self.adapted_rows(sequences)?;
        b.resize(n, h, c.num_attention_heads * c.head_dim, self.kv_dim(), c.intermediate_size);

        self.embed(&tokens, &mut b.x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            rms_norm(&b.x, &layer.attn_norm, eps, &mut b.xb);
            self.matmul(&layer.attn_q, &b.xb, n, &mut b.q)?;
            self.matmul(&layer.attn_k, &b.xb, n, &mut b.k)?;
            self.matmul(&layer.attn_v, &b.xb, n, &mut b.v)?;
            self.add_lora(&adapted, l, Projection::Q, &b.xb, &mut b.q)?;
            self.add_lora(&adapted, l, Projection::K, &b.xb, &mut b.k)?;
            self.add_lora(&adapted, l, Projection::V, &b.xb, &mut b.v)?;
            rope(&mut b.q, &turns, c.head_dim);
            rope(&mut b.k, &turns, c.head_dim);
            let mut row = 0;
            for (ids, cache) in sequences.iter_mut() {
                let rows = row * self.kv_dim()..(row + ids.len()) * self.kv_dim();
                cache.write(l, &b.k[rows.clone()], &b.v[rows]);
                row += ids.len();
            }
            let pages: Vec<_> = sequences.iter().map(|(_, cache)| cache.pages(l)).collect();
            let mut row = 0;
            let views: Vec<AttentionSeq> = sequences
                .iter()
                .zip(&pages)
                .map(|((ids, cache), (keys, values))| {
                    let q_dim = self.heads().q_dim();
                    let queries = &b.q[row * q_dim..(row + ids.len()) * q_dim];
                    row += ids.len();
                    let positions = cache.len() + ids.len();
                    let view = |pages| KvView::Paged { pages, page_positions: BLOCK_TOKENS, positions };
                    AttentionSeq { queries, keys: view(keys), values: view(values) }
                })
                .collect();
            attention(self.heads(), &views, &mut b.att, &self.pool)?;
            self.matmul(&layer.attn_output, &b.att, n, &mut b.xb)?;
            self.add_lora(&adapted, l, Projection::O, &b.att, &mut b.xb)?;
            add(&mut b.x, &b.xb);

            // Feed-forward (SwiGLU).
            rms_norm(&b.x, &layer.ffn_norm, eps, &mut b.xb);
            self.matmul(&layer.ffn_gate, &b.xb, n, &mut b.hb)?;
            self.matmul(&layer.ffn_up, &b.xb, n, &mut b.hb2)?;
            self.add_lora(&adapted, l, Projection::Gate, &b.xb, &mut b.hb)?;
            self.add_lora(&adapted, l, Projection::Up, &b.xb, &mut b.hb2)?;
            self.silu_mul(&mut b.hb, &b.hb2);
            self.matmul(&layer.ffn_down, &b.hb, n, &mut b.xb)?;
            self.add_lora(&adapted, l, Projection::Down, &b.hb, &mut b.xb)?;
            add(&mut b.x, &b.xb);
        }
        for (ids, cache) in sequences.iter_mut() {
            cache.commit(ids.len());
        }
        rms_norm(&b.x, &self.output_norm, eps, &mut b.xb);
        Ok(())
    }

    /// The rows of a step that run an adapter, grouped: each run of consecutive sequences with the same adapter is
    /// one range of rows (sequences on the base model have none).
    fn adapted_rows(&self, sequences: &[(&[u32], &mut QuantCache)]) -> Result<AdaptedRows> {
        let mut groups: Vec<(Range<usize>, Arc<LoraAdapter>)> = Vec::new();
        let mut row = 0;
        for (ids, cache) in sequences {
            let rows = row..row + ids.len();
            row = rows.end;
            let Some(adapter) = cache.lora() else { continue };
            self.check_lora(adapter)?;
            match groups.last_mut() {
                Some((last, same)) if last.end == rows.start && Arc::ptr_eq(same, adapter) => last.end = rows.end,
                _ => groups.push((rows, adapter.clone())),
            }
        }
        Ok(AdaptedRows { rows: row, groups })
    }

    /// Each group's adapter term for projection `p` of layer `l`: `out` (`n × out`) gets `scale·(x·Aᵀ)·Bᵀ` added on
    /// the group's rows of `x` (`n × in`), after the base product over all rows.
    fn add_lora(&self, groups: &AdaptedRows, l: usize, p: Projection, x: &[f32], out: &mut [f32]) -> Result<()> {
        let n = groups.rows;
        let (in_dim, out_dim) = (x.len() / n, out.len() / n);
        for (rows, adapter) in &groups.groups {
            let x = &x[rows.start * in_dim..rows.end * in_dim];
            let out = &mut out[rows.start * out_dim..rows.end * out_dim];
            adapter.add_to(l, p, x, rows.len(), out, &self.pool)?;
        }
        Ok(())
    }

    /// [`silu_mul`] over the pool for a prompt's rows, on this thread for a few rows.
    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        if gate.len() <= SILU_PIECE || self.threads() == 1 {
            return silu_mul(gate, up);
        }
        self.pool.install(|| {
            gate.par_chunks_mut(SILU_PIECE).zip(up.par_chunks(SILU_PIECE)).for_each(|(g, u)| silu_mul(g, u))
        });
    }

    /// Logits `rows × vocab` of normalized hidden states `rows × hidden`.
    fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut logits = vec![0.0; rows * self.config.vocab_size];
        self.matmul(&self.output, hidden, rows, &mut logits)?;
        Ok(logits)
    }

    /// Rows of the embedding table, widened to f32 whatever their type.
    fn embed(&self, tokens: &[u32], x: &mut [f32]) -> Result<()> {
        let table = self.borrow(&self.token_embd)?;
        for (&id, row) in tokens.iter().zip(x.chunks_exact_mut(self.config.hidden_size)) {
            let id = id as usize;
            dequantize_row(table.ty(), table.rows_data(id..id + 1), row)?;
        }
        Ok(())
    }

    /// `out (n × rows) = x (n × cols) · Wᵀ` on the model's pool.
    fn matmul(&self, w: &Matrix, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        Ok(matmul(&self.borrow(w)?, x, n, out, &self.pool)?)
    }

    /// The bytes of a matrix: its own rewritten copy, or looked up again in the source (a map lookup; nothing is
    /// copied).
    fn borrow<'m>(&'m self, m: &'m Matrix) -> Result<QuantMatrix<'m>> {
        if let Some(packed) = &m.packed {
            return Ok(packed.matrix());
        }
        let tensor = self
            .source
            .tensor(&m.name)
            .ok_or_else(|| Error::msg(format!("tensor {} is no longer in the weight source", m.name)))?;
        if tensor.ty != m.ty {
            return Err(Error::msg(format!("tensor {} changed type in the weight source", m.name)));
        }
        Ok(QuantMatrix::new(m.ty, m.rows, m.cols, tensor.data)?)
    }

    /// `(cos, sin)` of every rotated pair's angle `position · theta^(-2i/head_dim)` at each position: `positions ×
    /// head_dim/2`, computed once a step for every layer.
    fn rope_turns(&self, positions: &[usize]) -> Vec<(f32, f32)> {
        let pairs = positions.iter().flat_map(|&pos| self.rope_freqs.iter().map(move |freq| pos as f64 * freq));
        // The angle in f64, rounded once: agrees with transformers' f32 tables to ~1e-7 at any position.
        pairs.map(|angle| (angle.cos() as f32, angle.sin() as f32)).collect()
    }
}

/// The rows of one step and which of them run an adapter (runs of rows, by adapter).
struct AdaptedRows {
    rows: usize,
    groups: Vec<(Range<usize>, Arc<LoraAdapter>)>,
}

/// Rotary position embedding in the interleaved (GGUF / Meta) layout: each head's adjacent pairs
/// `(x[2i], x[2i+1])` turn by the row's angles `turns` (from [`QuantLlama::rope_turns`]). `x` is
/// `rows × (heads · head_dim)`.
fn rope(x: &mut [f32], turns: &[(f32, f32)], head_dim: usize) {
    let rows = turns.len() / (head_dim / 2);
    for (row, turns) in x.chunks_exact_mut(x.len() / rows).zip(turns.chunks_exact(head_dim / 2)) {
        for head in row.chunks_exact_mut(head_dim) {
            for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(turns) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }
}

impl Buffers {
    fn resize(&mut self, rows: usize, hidden: usize, q_dim: usize, kv_dim: usize, intermediate: usize) {
        for (buf, width) in [
            (&mut self.x, hidden),
            (&mut self.xb, hidden),
            (&mut self.q, q_dim),
            (&mut self.k, kv_dim),
            (&mut self.v, kv_dim),
            (&mut self.att, q_dim),
            (&mut self.hb, intermediate),
            (&mut self.hb2, intermediate),
        ] {
            buf.resize(rows * width, 0.0);
        }
    }
}

/// What this implementation cannot run, from the config alone.
fn config_problems(c: &LlamaConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if c.hidden_size == 0 || c.num_hidden_layers == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
        problems.push("hidden_size, intermediate_size, num_hidden_layers and vocab_size must be positive".into());
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        problems.push(format!("head_dim {} must be positive and even (RoPE turns pairs)", c.head_dim));
    }
    if c.num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        problems.push(format!(
            "num_attention_heads {} must be a multiple of num_key_value_heads {}",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if c.rope_scaling.is_some() {
        problems.push("rope_scaling is not supported".into());
    }
    problems
}

/// Checks tensors against the shapes the config implies, collecting every problem.
struct Checker<'a> {
    source: &'a dyn TensorSource,
    problems: &'a mut Vec<String>,
}

impl Checker<'_> {
    /// A `rows × cols` matrix (ggml dims `[cols, rows]`).
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Matrix {
        let mut matrix = Matrix { name: name.to_string(), ty: GgmlType::F32, rows, cols, packed: None };
        let Some(t) = self.source.tensor(name) else {
            self.problems.push(format!("{name} is missing"));
            return matrix;
        };
        matrix.ty = t.ty;
        if t.dims != [cols, rows] {
            self.problems.push(format!("{name} has dims {:?}, the config implies [{cols}, {rows}]", t.dims));
        } else if let Err(e) = QuantMatrix::new(t.ty, rows, cols, t.data) {
            self.problems.push(format!("{name} ({}): {e}", t.ty));
        }
        matrix
    }

    /// A vector of `len` values, widened to f32.
    fn vector(&mut self, name: &str, len: usize) -> Vec<f32> {
        let mut values = vec![0.0; len];
        let Some(t) = self.source.tensor(name) else {
            self.problems.push(format!("{name} is missing"));
            return values;
        };
        if t.dims != [len] {
            self.problems.push(format!("{name} has dims {:?}, the config implies [{len}]", t.dims));
        } else if let Err(e) = dequantize_row(t.ty, t.data, &mut values) {
            self.problems.push(format!("{name} ({}): {e}", t.ty));
        }
        values
    }
}

/// RMSNorm of each row: `x / sqrt(mean(x²) + eps) * weight`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for (x, out) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        out.iter_mut().zip(x).zip(weight).for_each(|((o, v), w)| *o = v * inv * w);
    }
}

/// `gate = silu(gate) * up`, with `silu(g) = g · sigmoid(g)`.
fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// Elements of the feed-forward hidden layer per parallel piece of [`silu_mul`]: one `exp` each, so a prompt's
/// (rows × intermediate) is worth spreading over the threads, a decoding step's is not.
const SILU_PIECE: usize = 1 << 15;

/// The residual connection: `x += delta`.
fn add(x: &mut [f32], delta: &[f32]) {
    x.iter_mut().zip(delta).for_each(|(x, d)| *x += d);
}
