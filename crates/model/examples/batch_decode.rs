//! Time of one decoding step for a batch of sequences (what continuous batching runs every step): `n` sequences,
//! each with a short prompt already in its cache, each given one new token, in one `forward_ragged` call.
//!
//! ```text
//! cargo run --release -p vicuna-model --example batch_decode -- --model M.gguf [--threads 1,2] [--batch 1,2,4,8,16]
//!     [--steps 8] [--context 16]
//! ```
//!
//! With `VICUNA_KERNELS_MULTI_ROW=0` in the environment, matmul takes the path it took before the multi-row
//! kernels (one row at a time below 8 activation rows, the GEMM from 8): run both to compare.
//! Prints milliseconds per step (median of `--steps`) and tokens per second (`n` / step time).

use std::path::PathBuf;
use std::time::Instant;

use vicuna_model::QuantLlama;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut model, mut threads, mut batch, mut steps, mut context) =
        (None, vec![1, 2], vec![1, 2, 4, 8, 16], 8usize, 16usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).ok_or_else(|| format!("{} needs a value", pair[0]))?;
        let list = |v: &str| v.split(',').map(|n| n.parse::<usize>()).collect::<Result<Vec<_>, _>>();
        match pair[0].as_str() {
            "--model" => model = Some(PathBuf::from(value)),
            "--threads" => threads = list(value)?,
            "--batch" => batch = list(value)?,
            "--steps" => steps = value.parse()?,
            "--context" => context = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let model_path = model.ok_or("--model is required")?;
    println!("{:>7} {:>5} {:>10} {:>9}", "threads", "n", "ms/step", "tok/s");
    for &t in &threads {
        let model = QuantLlama::load(&model_path, t)?;
        let vocab = model.config().vocab_size as u32;
        for &n in &batch {
            let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
            let token = |i: usize| 3 + (i as u32 * 7919) % (vocab - 3);
            let prompt: Vec<u32> = (0..context).map(token).collect();
            for cache in caches.iter_mut() {
                model.next_token_logits(&prompt, cache)?;
            }
            let mut times = Vec::new();
            for s in 0..=steps {
                let ids: Vec<[u32; 1]> = (0..n).map(|c| [token(s * n + c + context)]).collect();
                let mut seqs: Vec<(&[u32], &mut _)> =
                    ids.iter().zip(caches.iter_mut()).map(|(ids, cache)| (&ids[..], cache)).collect();
                let start = Instant::now();
                model.forward_ragged(&mut seqs)?;
                if s > 0 {
                    // The first step warms up.
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let step = times[times.len() / 2];
            println!("{t:>7} {n:>5} {:>10.1} {:>9.2}", step * 1e3, n as f64 / step);
        }
    }
    Ok(())
}
