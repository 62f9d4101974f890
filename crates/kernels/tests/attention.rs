//! The attention kernel: the scalar level against a plain softmax computed in f64 (full score rows, the textbook
//! formula), every SIMD level against the scalar one, on ragged shapes (odd lengths, head_dim 8…128, grouped-query),
//! f16 and f32 caches, several sequences in one call, and multi-threaded runs against single-threaded ones bit for
//! bit.

use vicuna_kernels::attention::{KEY_BLOCK, QUERY_BLOCK};
use vicuna_kernels::{
    attention_with, f32_to_f16, AttentionSeq, HeadLayout, Isa, KvSlice, KvView, ThreadPool, ThreadPoolBuilder,
};

use half::f16;

/// A small deterministic generator (64-bit LCG, top bits), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.next_f32() * 2.0 - 1.0) * scale).collect()
    }
}

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// One sequence's data: `rows` new queries over `positions` cached keys/values.
struct SeqData {
    queries: Vec<f32>,
    keys: Vec<f16>,
    values: Vec<f16>,
    /// The same keys and values widened to f32, for the f32 cache.
    keys_f32: Vec<f32>,
    values_f32: Vec<f32>,
}

impl SeqData {
    fn random(layout: HeadLayout, rows: usize, positions: usize, rng: &mut Rng) -> SeqData {
        // Queries scaled so that scores spread over several units: softmax weights far from uniform.
        let queries = rng.values(rows * layout.q_dim(), 3.0);
        let keys: Vec<f16> = rng.values(positions * layout.kv_dim(), 1.0).into_iter().map(f16::from_f32).collect();
        let values: Vec<f16> = rng.values(positions * layout.kv_dim(), 1.0).into_iter().map(f16::from_f32).collect();
        let keys_f32 = keys.iter().map(|k| k.to_f32()).collect();
        let values_f32 = values.iter().map(|v| v.to_f32()).collect();
        SeqData { queries, keys, values, keys_f32, values_f32 }
    }
    fn view(&self) -> AttentionSeq<'_> {
        AttentionSeq {
            queries: &self.queries,
            keys: KvSlice::F16(&self.keys).into(),
            values: KvSlice::F16(&self.values).into(),
        }
    }
    fn view_f32(&self) -> AttentionSeq<'_> {
        AttentionSeq {
            keys: KvSlice::F32(&self.keys_f32).into(),
            values: KvSlice::F32(&self.values_f32).into(),
            ..self.view()
        }
    }
}

/// The textbook formula in f64: all scores of a row, softmax, weighted sum.
fn reference(layout: HeadLayout, seq: &SeqData) -> Vec<f32> {
    let HeadLayout { n_heads, n_kv_heads, head_dim: d } = layout;
    let rows = seq.queries.len() / layout.q_dim();
    let positions = seq.keys.len() / layout.kv_dim();
    let mut out = vec![0.0f32; rows * layout.q_dim()];
    for r in 0..rows {
        let seen = positions - rows + r + 1;
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv_heads);
            let q = &seq.queries[r * layout.q_dim() + h * d..][..d];
            let scores: Vec<f64> = (0..seen)
                .map(|p| {
                    let k = &seq.keys[p * layout.kv_dim() + kvh * d..][..d];
                    q.iter().zip(k).map(|(&a, b)| a as f64 * b.to_f64()).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..d {
                let v: f64 =
                    (0..seen).map(|p| weights[p] * seq.values[p * layout.kv_dim() + kvh * d + i].to_f64()).sum();
                out[r * layout.q_dim() + h * d + i] = (v / total) as f32;
            }
        }
    }
    out
}

fn run(isa: Isa, layout: HeadLayout, seqs: &[SeqData], threads: usize) -> Vec<f32> {
    run_views(isa, layout, &seqs.iter().map(SeqData::view).collect::<Vec<_>>(), threads)
}

fn run_views(isa: Isa, layout: HeadLayout, views: &[AttentionSeq], threads: usize) -> Vec<f32> {
    let rows: usize = views.iter().map(|s| s.queries.len() / layout.q_dim()).sum();
    let mut out = vec![f32::NAN; rows * layout.q_dim()];
    attention_with(isa, layout, views, &mut out, &pool(threads)).unwrap();
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Shapes covering: one decode row over a long cache, a prompt from scratch (rows = positions), a chunk after a
/// cached prefix, lengths straddling the key and query blocks, head_dim with and without a SIMD tail.
fn cases() -> Vec<(HeadLayout, Vec<(usize, usize)>)> {
    let layouts = [
        HeadLayout { n_heads: 4, n_kv_heads: 4, head_dim: 8 },
        HeadLayout { n_heads: 4, n_kv_heads: 2, head_dim: 16 },
        HeadLayout { n_heads: 3, n_kv_heads: 3, head_dim: 32 },
        HeadLayout { n_heads: 8, n_kv_heads: 1, head_dim: 64 },
        HeadLayout { n_heads: 2, n_kv_heads: 2, head_dim: 128 },
        HeadLayout { n_heads: 2, n_kv_heads: 1, head_dim: 40 },
    ];
    let shapes = vec![
        (1, 1),
        (1, 2 * KEY_BLOCK + 3),
        (2 * QUERY_BLOCK + 5, 2 * QUERY_BLOCK + 5),
        (7, KEY_BLOCK + 30),
        (QUERY_BLOCK, 3 * KEY_BLOCK),
    ];
    layouts.into_iter().map(|l| (l, shapes.clone())).collect()
}

#[test]
fn scalar_matches_the_textbook_softmax() {
    let mut rng = Rng(1);
    for (layout, shapes) in cases() {
        for (rows, positions) in shapes {
            let seq = SeqData::random(layout, rows, positions, &mut rng);
            let want = reference(layout, &seq);
            let got = run(Isa::Scalar, layout, std::slice::from_ref(&seq), 1);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 2e-6, "{layout:?} rows {rows} positions {positions}: scalar differs by {diff}");
            // The same values in an f32 cache give the same result.
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let f16_cache = run(isa, layout, std::slice::from_ref(&seq), 1);
                let f32_cache = run_views(isa, layout, &[seq.view_f32()], 1);
                assert_eq!(f32_cache, f16_cache, "{isa:?} {layout:?}: the f32 cache differs from the f16 one");
            }
        }
    }
}

#[test]
fn simd_levels_match_scalar() {
    let mut rng = Rng(2);
    for isa in Isa::ALL.into_iter().filter(|i| *i != Isa::Scalar && i.is_available()) {
        for (layout, shapes) in cases() {
            for (rows, positions) in shapes {
                let seq = SeqData::random(layout, rows, positions, &mut rng);
                let want = run(Isa::Scalar, layout, std::slice::from_ref(&seq), 1);
                let got = run(isa, layout, std::slice::from_ref(&seq), 1);
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 2e-6, "{isa:?} {layout:?} rows {rows} positions {positions}: differs by {diff}");
            }
        }
    }
}

/// Several sequences in one call (a decode row, a chunk after a prefix, a fresh prompt) give each its own result,
/// and threads change nothing, bit for bit.
#[test]
fn ragged_batch_and_threads() {
    let mut rng = Rng(3);
    let layout = HeadLayout { n_heads: 4, n_kv_heads: 2, head_dim: 32 };
    let seqs = vec![
        SeqData::random(layout, 1, 77, &mut rng),
        SeqData::random(layout, 19, 40, &mut rng),
        SeqData::random(layout, 33, 33, &mut rng),
    ];
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        let together = run(isa, layout, &seqs, 1);
        let mut at = 0;
        for seq in &seqs {
            let alone = run(isa, layout, std::slice::from_ref(seq), 1);
            assert_eq!(&together[at..at + alone.len()], &alone[..], "{isa:?}: batched differs from alone");
            at += alone.len();
        }
        assert_eq!(run(isa, layout, &seqs, 2), together, "{isa:?}: two threads differ from one");
        assert_eq!(run(isa, layout, &seqs, 3), together, "{isa:?}: three threads differ from one");
    }
}

/// Keys and values read through a page table (pages of a paged KV cache, scattered in a pool in any order, the last
/// page partly used) give the same output bit for bit as the same positions in one buffer, at every level, for page
/// sizes below, at and above the kernel's key block.
#[test]
fn paged_views_match_contiguous_ones_bit_for_bit() {
    let layout = HeadLayout { n_heads: 4, n_kv_heads: 2, head_dim: 32 };
    let mut rng = Rng(6);
    for (rows, positions) in [(1, 1), (1, 2 * KEY_BLOCK + 3), (7, KEY_BLOCK + 30), (QUERY_BLOCK + 3, QUERY_BLOCK + 3)] {
        let seq = SeqData::random(layout, rows, positions, &mut rng);
        for page_positions in [1, 5, 16, KEY_BLOCK, KEY_BLOCK + 7] {
            let kv_dim = layout.kv_dim();
            let page_len = page_positions * kv_dim;
            let pages = positions.div_ceil(page_positions);
            // Page i of the sequence sits in pool slot (pages - 1 - i): the table is reversed, and every slot has
            // room for a whole page (garbage past the sequence's end).
            let scatter = |data: &[f16]| -> Vec<f16> {
                let mut pool = vec![f16::from_f32(1e4); pages * page_len];
                for (i, chunk) in data.chunks(page_len).enumerate() {
                    let slot = pages - 1 - i;
                    pool[slot * page_len..][..chunk.len()].copy_from_slice(chunk);
                }
                pool
            };
            let (key_pool, value_pool) = (scatter(&seq.keys), scatter(&seq.values));
            fn table(pool: &[f16], pages: usize, page_len: usize) -> Vec<KvSlice<'_>> {
                (0..pages).map(|i| KvSlice::F16(&pool[(pages - 1 - i) * page_len..][..page_len])).collect()
            }
            let (key_pages, value_pages) = (table(&key_pool, pages, page_len), table(&value_pool, pages, page_len));
            let paged = AttentionSeq {
                queries: &seq.queries,
                keys: KvView::Paged { pages: &key_pages, page_positions, positions },
                values: KvView::Paged { pages: &value_pages, page_positions, positions },
            };
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let contiguous = run_views(isa, layout, &[seq.view()], 1);
                let got = run_views(isa, layout, &[paged], 2);
                assert_eq!(got, contiguous, "{isa:?}, {rows} rows over {positions}, pages of {page_positions}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let layout = HeadLayout { n_heads: 4, n_kv_heads: 2, head_dim: 16 };
    let mut rng = Rng(4);
    let seq = SeqData::random(layout, 3, 5, &mut rng);
    let pool = pool(1);
    let mut out = vec![0.0; 3 * layout.q_dim()];
    let check = |layout: HeadLayout, seq: AttentionSeq, out: &mut [f32]| {
        attention_with(Isa::Scalar, layout, &[seq], out, &pool).unwrap_err().to_string()
    };
    // More new rows than cached positions.
    let short = AttentionSeq {
        keys: KvSlice::F16(&seq.keys[..2 * layout.kv_dim()]).into(),
        values: KvSlice::F16(&seq.values[..2 * layout.kv_dim()]).into(),
        ..seq.view()
    };
    assert!(check(layout, short, &mut out).contains("cached positions"));
    // Queries not a whole number of rows.
    let ragged = AttentionSeq { queries: &seq.queries[1..], ..seq.view() };
    assert!(check(layout, ragged, &mut out).contains("queries"));
    // Values shorter than keys.
    let values = AttentionSeq { values: KvSlice::F32(&seq.values_f32[..layout.kv_dim()]).into(), ..seq.view() };
    assert!(check(layout, values, &mut out).contains("values"));
    // A page table missing a page, and a page shorter than the positions it claims.
    let pages = [KvSlice::F16(&seq.keys[..4 * layout.kv_dim()])];
    let missing = AttentionSeq { keys: KvView::Paged { pages: &pages, page_positions: 4, positions: 5 }, ..seq.view() };
    assert!(check(layout, missing, &mut out).contains("keys"));
    let pages = [KvSlice::F16(&seq.keys[..4 * layout.kv_dim()]), KvSlice::F16(&seq.keys[..layout.kv_dim() - 1])];
    let short_page =
        AttentionSeq { keys: KvView::Paged { pages: &pages, page_positions: 4, positions: 5 }, ..seq.view() };
    assert!(check(layout, short_page, &mut out).contains("keys"));
    // Query heads not a multiple of the key/value heads.
    let odd = HeadLayout { n_heads: 3, n_kv_heads: 2, head_dim: 16 };
    assert!(check(odd, seq.view(), &mut out).contains("heads"));
    // Output of the wrong size.
    assert!(check(layout, seq.view(), &mut out[1..]).contains("output"));
}

/// The cache's f16 conversion rounds exactly as `half` does (nearest, ties to even), over every length's tail, and
/// through overflow, subnormals, infinities and NaN.
#[test]
fn f16_conversion_matches_half() {
    let mut rng = Rng(5);
    let mut values = rng.values(1000, 70000.0);
    values.extend(rng.values(1000, 1e-5));
    values.extend([0.0, -0.0, 65504.0, 65520.0, 1e-8, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE]);
    for len in [0, 1, 7, 8, 9, 31, values.len()] {
        let mut got = vec![f16::ZERO; len];
        f32_to_f16(&values[..len], &mut got).unwrap();
        let want: Vec<f16> = values[..len].iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(
            got.iter().map(|h| h.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|h| h.to_bits()).collect::<Vec<_>>()
        );
    }
    let mut nan = [f16::ZERO];
    f32_to_f16(&[f32::NAN], &mut nan).unwrap();
    assert!(nan[0].is_nan());
    assert!(f32_to_f16(&[1.0, 2.0], &mut nan).is_err());
}
