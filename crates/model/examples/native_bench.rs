//! Speed of the native forward pass on a random model of a real shape, like llama-bench: prompt processing
//! (`pp`, one step of `--prompt` tokens) and generation (`tg`, `--gen` single-token steps from an empty cache),
//! at each thread count, with the weight bandwidth that decoding achieves.
//!
//! The weights are random blocks written directly in their quantized form (no f32 detour), held in memory.
//!
//! ```text
//! cargo run --release -p vicuna-model --example native_bench -- --shape 13b --type q4_0 --threads 1,2
//! ```
//! Options: `--shape 13b|7b|small`, `--type q4_0|q8_0|q4_K|q6_K|f16`, `--output-type TYPE` (default: q6_K for
//! q4_0/q4_K as llama-quantize does, else `--type`), `--threads 1,2`, `--prompt 512`, `--gen 32`, `--reps 1`,
//! `--attention-only` (time only the prompt's attention, without making weights).

use std::sync::Arc;
use std::time::Instant;

use vicuna_kernels::{
    attention, matmul, row_size, AttentionSeq, GgmlType, HeadLayout, KvSlice, QuantMatrix, ThreadPoolBuilder,
};
use vicuna_model::native::{OwnedTensors, QuantLlama, TensorSource};
use vicuna_weights::LlamaConfig;

struct Options {
    shape: String,
    ty: GgmlType,
    output_ty: Option<GgmlType>,
    threads: Vec<usize>,
    prompt: usize,
    gen: usize,
    reps: usize,
    /// Only time the attention of a `prompt`-token prompt (no weights are made).
    attention_only: bool,
}

fn parse_type(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name)).unwrap_or_else(|| {
        eprintln!("unknown type {name}");
        std::process::exit(2)
    })
}

fn options() -> Options {
    let mut o = Options {
        shape: "13b".into(),
        ty: GgmlType::Q4_0,
        output_ty: None,
        threads: vec![1, 2],
        prompt: 512,
        gen: 32,
        reps: 1,
        attention_only: false,
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--attention-only") {
        args.remove(at);
        o.attention_only = true;
    }
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_else(|| {
            eprintln!("{} needs a value", pair[0]);
            std::process::exit(2)
        });
        let number = |v: &str| -> usize {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{} takes a number, not {v}", pair[0]);
                std::process::exit(2)
            })
        };
        match pair[0].as_str() {
            "--shape" => o.shape = value.into(),
            "--type" => o.ty = parse_type(value),
            "--output-type" => o.output_ty = Some(parse_type(value)),
            "--threads" => o.threads = value.split(',').map(number).collect(),
            "--prompt" => o.prompt = number(value),
            "--gen" => o.gen = number(value),
            "--reps" => o.reps = number(value).max(1),
            other => {
                eprintln!("unknown option {other}");
                std::process::exit(2)
            }
        }
    }
    o
}

fn config(shape: &str) -> LlamaConfig {
    let (hidden, inter, layers, heads, vocab) = match shape {
        "13b" => (5120, 13824, 40, 40, 32001),
        "7b" => (4096, 11008, 32, 32, 32000),
        "small" => (1024, 2816, 8, 8, 32000),
        other => {
            eprintln!("unknown shape {other} (13b, 7b, small)");
            std::process::exit(2)
        }
    };
    let json = format!(
        r#"{{"vocab_size": {vocab}, "hidden_size": {hidden}, "intermediate_size": {inter},
            "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048, "model_type": "llama"}}"#
    );
    LlamaConfig::from_json_str(&json, shape).expect("valid config")
}

/// xorshift64*: fast, good enough to fill weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Byte offsets of the f16 scales inside one block of `ty` (the rest of a block is free random bits).
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// A `rows × cols` matrix of random blocks whose scales make values of roughly `1/sqrt(cols)`.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; rows * row_size(ty, cols).expect("whole blocks")];
    for chunk in data.chunks_mut(8) {
        let bits = rng.next().to_le_bytes();
        chunk.copy_from_slice(&bits[..chunk.len()]);
    }
    let scale = half::f16::from_f32(0.1 / (cols as f32).sqrt()).to_le_bytes();
    if ty == GgmlType::F16 {
        // Random f16 bits include NaNs and huge values: use the scale itself, sign from the random bits.
        for pair in data.chunks_exact_mut(2) {
            let sign = pair[1] & 0x80;
            pair.copy_from_slice(&[scale[0], scale[1] | sign]);
        }
    }
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in scale_offsets(ty) {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    data
}

fn build_source(config: &LlamaConfig, ty: GgmlType, output_ty: GgmlType) -> OwnedTensors {
    let (h, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut source = OwnedTensors::new();
    let mut matrix = |source: &mut OwnedTensors, name: String, ty: GgmlType, rows: usize, cols: usize| {
        source.insert(name, ty, vec![cols, rows], random_matrix(ty, rows, cols, &mut rng));
    };
    let ones = |len: usize| 1.0f32.to_le_bytes().repeat(len);
    matrix(&mut source, "token_embd.weight".into(), ty, vocab, h);
    for i in 0..config.num_hidden_layers {
        for (part, rows, cols) in [
            ("attn_q", h, h),
            ("attn_k", h, h),
            ("attn_v", h, h),
            ("attn_output", h, h),
            ("ffn_gate", inter, h),
            ("ffn_up", inter, h),
            ("ffn_down", h, inter),
        ] {
            matrix(&mut source, format!("blk.{i}.{part}.weight"), ty, rows, cols);
        }
        source.insert(format!("blk.{i}.attn_norm.weight"), GgmlType::F32, vec![h], ones(h));
        source.insert(format!("blk.{i}.ffn_norm.weight"), GgmlType::F32, vec![h], ones(h));
    }
    source.insert("output_norm.weight", GgmlType::F32, vec![h], ones(h));
    matrix(&mut source, "output.weight".into(), output_ty, vocab, h);
    source
}

/// Seconds per token of only the matrix-vector products of a decoding step (every layer matrix and the output
/// matrix, one activation row), and the bytes they read: the kernels' share of a step.
fn matmuls_alone(config: &LlamaConfig, source: &dyn TensorSource, threads: usize, tokens: usize) -> (f64, usize) {
    let pool = ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let mut names: Vec<String> = (0..config.num_hidden_layers)
        .flat_map(|i| {
            ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
                .map(|part| format!("blk.{i}.{part}.weight"))
        })
        .collect();
    names.push("output.weight".into());
    let matrices: Vec<QuantMatrix> = names
        .iter()
        .map(|name| {
            let t = source.tensor(name).expect("present");
            QuantMatrix::new(t.ty, t.dims[1], t.dims[0], t.data).expect("valid")
        })
        .collect();
    let x = vec![0.01f32; config.intermediate_size.max(config.hidden_size)];
    let mut out = vec![0.0f32; config.intermediate_size.max(config.vocab_size)];
    let started = Instant::now();
    for _ in 0..tokens {
        for m in &matrices {
            matmul(m, &x[..m.cols()], 1, &mut out[..m.rows()], &pool).expect("matmul");
        }
    }
    let bytes = matrices.iter().map(|m| m.data().len()).sum();
    (started.elapsed().as_secs_f64() / tokens as f64, bytes)
}

/// Seconds that the attention of a `rows`-token prompt takes over all layers (random f16 keys and values).
fn attention_alone(config: &LlamaConfig, threads: usize, rows: usize) -> f64 {
    let pool = ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let layout = HeadLayout {
        n_heads: config.num_attention_heads,
        n_kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
    };
    let mut rng = Rng(7);
    let mut random =
        |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect() };
    let queries = random(rows * layout.q_dim());
    let keys: Vec<half::f16> = random(rows * layout.kv_dim()).into_iter().map(half::f16::from_f32).collect();
    let values: Vec<half::f16> = random(rows * layout.kv_dim()).into_iter().map(half::f16::from_f32).collect();
    let seq =
        AttentionSeq { queries: &queries, keys: KvSlice::F16(&keys).into(), values: KvSlice::F16(&values).into() };
    let mut out = vec![0.0f32; rows * layout.q_dim()];
    let started = Instant::now();
    for _ in 0..config.num_hidden_layers {
        attention(layout, &[seq], &mut out, &pool).expect("attention");
    }
    started.elapsed().as_secs_f64()
}

/// CPU seconds this process has used (user + system, from /proc; 0 where there is none). On a shared machine it
/// moves less than wall time when other work takes turns on the cores.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces): utime and stime are 12 and 13.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len().max(2) - 1) as f64;
    (mean, var.sqrt())
}

fn main() {
    let o = options();
    let config = config(&o.shape);
    let output_ty = o.output_ty.unwrap_or(match o.ty {
        GgmlType::Q4_0 | GgmlType::Q4_K => GgmlType::Q6_K,
        other => other,
    });
    if o.attention_only {
        for &threads in &o.threads {
            let seconds = attention_alone(&config, threads, o.prompt);
            println!("threads {threads}: attention of a {}-token prompt, all layers: {seconds:.2} s", o.prompt);
        }
        return;
    }
    let started = Instant::now();
    let source = Arc::new(build_source(&config, o.ty, output_ty));
    println!(
        "{} {} (output {}): {:.2} GB of weights, generated in {:.1} s",
        o.shape,
        o.ty,
        output_ty,
        source.data_bytes() as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    let prompt: Vec<u32> = (0..o.prompt as u32).map(|i| (i * 7919 + 1) % config.vocab_size as u32).collect();
    for &threads in &o.threads {
        let model = QuantLlama::new(config.clone(), source.clone(), threads).expect("valid model");
        let step_bytes = model.weight_bytes_per_step() as f64;
        // Warm-up: pages in the weights, starts the threads.
        model.next_token_logits(&[1], &mut model.new_cache()).expect("forward");
        let (mut pp, mut tg, mut tg_cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..o.reps {
            if o.prompt > 0 {
                let mut cache = model.new_cache();
                let t = Instant::now();
                model.next_token_logits(&prompt, &mut cache).expect("forward");
                pp.push(o.prompt as f64 / t.elapsed().as_secs_f64());
            }
            if o.gen > 0 {
                let mut cache = model.new_cache();
                let (t, cpu) = (Instant::now(), cpu_seconds());
                let mut token = 1;
                for _ in 0..o.gen {
                    let logits = model.next_token_logits(&[token], &mut cache).expect("forward");
                    // Feed back a token (not the argmax: random logits; any id costs the same).
                    token = (logits.len() as u32 / 2 + cache.len() as u32) % config.vocab_size as u32;
                }
                tg.push(o.gen as f64 / t.elapsed().as_secs_f64());
                tg_cpu.push((cpu_seconds() - cpu) / o.gen as f64);
            }
        }
        if !pp.is_empty() {
            let (m, s) = mean_sd(&pp);
            let gflops = 2.0 * model.layer_parameters() as f64 * m / 1e9;
            println!("threads {threads}: pp{} {m:.2} ± {s:.2} tok/s  ({gflops:.0} GFLOP/s in the matrices)", o.prompt);
            let seconds = attention_alone(&config, threads, o.prompt);
            println!(
                "threads {threads}: attention's share of pp{}: {seconds:.2} s of {:.2} s",
                o.prompt,
                o.prompt as f64 / m
            );
        }
        if !tg.is_empty() {
            let (m, s) = mean_sd(&tg);
            let gbs = step_bytes * m / 1e9;
            let cpu_ms = mean_sd(&tg_cpu).0 * 1e3;
            println!(
                "threads {threads}: tg{} {m:.2} ± {s:.2} tok/s  ({gbs:.1} GB/s of weights; {cpu_ms:.0} ms CPU a token)",
                o.gen
            );
            let cpu = cpu_seconds();
            let (per_token, bytes) = matmuls_alone(&config, &*source, threads, o.gen);
            let cpu_ms = (cpu_seconds() - cpu) / o.gen as f64 * 1e3;
            println!(
                "threads {threads}: the same matrix-vector products alone: {:.2} tok/s ({:.1} GB/s; {cpu_ms:.0} ms CPU a token)",
                1.0 / per_token,
                bytes as f64 / per_token / 1e9
            );
        }
    }
}
