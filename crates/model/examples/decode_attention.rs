//! Time of one decoding step's attention (one query row per sequence) over a long f16 cache, over all layers, for
//! a contiguous cache and a paged one (blocks of `BLOCK_TOKENS`), like a chat's late turns.
//!
//! ```text
//! cargo run --release -p vicuna-model --example decode_attention -- 1180 2
//! ```
//! Arguments: positions (default 1024), threads (default 2). Shape: 7b (32 heads of 128, 32 layers).

use std::time::Instant;

use half::f16;
use vicuna_kernels::{attention, AttentionSeq, HeadLayout, KvSlice, KvView, ThreadPoolBuilder};
use vicuna_model::BLOCK_TOKENS;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let positions = args.first().copied().unwrap_or(1024);
    let threads = args.get(1).copied().unwrap_or(2);
    let (layers, layout) = (32, HeadLayout { n_heads: 32, n_kv_heads: 32, head_dim: 128 });
    let pool = ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let kv_dim = layout.kv_dim();
    let values = |seed: usize| -> Vec<f16> {
        (0..positions * kv_dim).map(|i| f16::from_f32((((i * 7919 + seed) % 1000) as f32 / 1000.0) - 0.5)).collect()
    };
    let (keys, vals) = (values(1), values(2));
    let query: Vec<f32> = (0..layout.q_dim()).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let mut out = vec![0.0f32; layout.q_dim()];
    let page = BLOCK_TOKENS * kv_dim;
    let key_pages: Vec<KvSlice> = keys.chunks(page).map(KvSlice::F16).collect();
    let value_pages: Vec<KvSlice> = vals.chunks(page).map(KvSlice::F16).collect();
    let contiguous =
        AttentionSeq { queries: &query, keys: KvSlice::F16(&keys).into(), values: KvSlice::F16(&vals).into() };
    let paged = AttentionSeq {
        queries: &query,
        keys: KvView::Paged { pages: &key_pages, page_positions: BLOCK_TOKENS, positions },
        values: KvView::Paged { pages: &value_pages, page_positions: BLOCK_TOKENS, positions },
    };
    for (name, seq) in [("contiguous", contiguous), ("paged", paged)] {
        let reps = 5;
        let started = Instant::now();
        for _ in 0..reps * layers {
            attention(layout, &[seq], &mut out, &pool).expect("attention");
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / reps as f64;
        let gb = (2 * positions * kv_dim * 2 * layers) as f64 / 1e9;
        println!(
            "{name:>10}: {positions} positions, {threads} threads: {ms:.1} ms a step ({:.1} GB/s of cache)",
            gb / ms * 1000.0
        );
    }
}
