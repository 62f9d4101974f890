//! `vicuna bench` (speed, the way llama-bench measures it) and `vicuna perplexity` (quality, the way
//! llama-perplexity measures it, with the KL divergence from a reference model).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::json;
use vicuna_engine::{
    generate_speculative, perplexity_chunks, ChunkLogProbs, Context, GenerationConfig, PerplexityStats, Rng,
    SamplingParams,
};
use vicuna_model::QuantLlama;

use crate::common::{compute_threads, LoraArgs, ModelArgs, SpeculativeArgs};
use crate::Result;

#[derive(Args)]
pub struct BenchArgs {
    /// A GGUF file or a Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Prompt processing test: tokens evaluated in one batch (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Text generation test: tokens generated one at a time (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// Verify test (what checking a speculative guess costs): one pass over k tokens that returns every row's
    /// logits, after a context of 64 tokens, for k = 1 to this (0 = skip).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub verify: usize,
    /// With --lookup or --draft-model: a speculative generation test (`sg`), -n tokens decoded greedily after
    /// BOS and 32 random tokens, with the share of guesses the model kept.
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Verify passes measured after this many tokens of context.
const VERIFY_CONTEXT: usize = 64;

/// Like llama-bench: random tokens; `pp` evaluates `-p` tokens in one step on an empty cache, `tg` evaluates `-n`
/// tokens one at a time after BOS; each test first warms up as llama-bench does (a prompt of up to 32 tokens, one
/// generated token), then runs `-r` times; tokens per second, mean and sample standard deviation over the runs.
pub fn run_bench(args: BenchArgs, threads: Option<usize>) -> Result<()> {
    if args.repetitions == 0 {
        return Err("-r must be at least 1".into());
    }
    let threads = compute_threads(threads);
    let load_start = Instant::now();
    let mut model = QuantLlama::load(&args.model, threads)?;
    args.lora.apply(&mut model)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let config = model.config();
    let context = config.max_position_embeddings;
    let speculating = args.speculative.speculates();
    let draft = args.speculative.load_draft(Some(threads))?;
    for (flag, tokens) in [
        ("-p", args.n_prompt),
        ("-n", args.n_gen + 1),
        ("--verify", if args.verify > 0 { VERIFY_CONTEXT + args.verify } else { 0 }),
        ("-n with speculation", if speculating { 33 + args.n_gen + args.speculative.draft_max } else { 0 }),
    ] {
        if tokens > context {
            return Err(format!("{flag} asks for {tokens} positions but the model's context is {context}").into());
        }
    }
    let mut rng = Rng::new(0);
    let vocab = config.vocab_size as u64;
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (3 + rng.next_u64() % (vocab - 3)) as u32).collect() };
    let bos = config.bos_token_id;

    let mut results = Vec::new();
    if args.n_prompt > 0 {
        let prompt = random_tokens(args.n_prompt);
        let run = |prompt: &[u32]| -> Result<f64> {
            let mut cache = model.new_cache();
            let start = Instant::now();
            model.next_token_logits(prompt, &mut cache)?;
            Ok(prompt.len() as f64 / start.elapsed().as_secs_f64())
        };
        run(&prompt[..prompt.len().min(32)])?;
        results.push(("pp", args.n_prompt, measure(|| run(&prompt), args.repetitions)?));
    }
    if args.n_gen > 0 {
        let tokens = random_tokens(args.n_gen);
        let run = |tokens: &[u32]| -> Result<f64> {
            let mut cache = model.new_cache();
            model.next_token_logits(&[bos], &mut cache)?;
            let start = Instant::now();
            for &token in tokens {
                model.next_token_logits(&[token], &mut cache)?;
            }
            Ok(tokens.len() as f64 / start.elapsed().as_secs_f64())
        };
        run(&tokens[..1])?;
        results.push(("tg", args.n_gen, measure(|| run(&tokens), args.repetitions)?));
    }
    // Passes per second of k rows each (k = 1..=K), from the same context each time.
    let mut verify = Vec::new();
    if args.verify > 0 {
        let mut cache = model.new_cache();
        let mut context = vec![bos];
        context.extend(random_tokens(VERIFY_CONTEXT - 1));
        model.next_token_logits(&context, &mut cache)?;
        let guesses = random_tokens(args.verify);
        for k in 1..=args.verify {
            let mut run = || -> Result<f64> {
                let start = Instant::now();
                model.forward_all(&guesses[..k], &mut cache)?;
                let rate = 1.0 / start.elapsed().as_secs_f64();
                cache.truncate(VERIFY_CONTEXT);
                Ok(rate)
            };
            run()?;
            verify.push((k, measure(run, args.repetitions)?));
        }
    }
    // Greedy speculative decoding: tokens per second, and guesses kept / made over all runs.
    let mut speculative = None;
    if speculating && args.n_gen > 0 {
        let mut prompt = vec![bos];
        prompt.extend(random_tokens(32));
        let config = GenerationConfig {
            sampling: SamplingParams { do_sample: false, ..SamplingParams::default() },
            max_new_tokens: args.n_gen,
            ignore_eos: true,
            ..GenerationConfig::default()
        };
        let counts = std::cell::Cell::new((0, 0));
        let run = || -> Result<f64> {
            let mut drafter = args.speculative.drafter(draft.as_ref(), &model, &config.sampling, 0)?;
            let mut context = Context::new(&model);
            let start = Instant::now();
            let generation =
                generate_speculative(&mut context, &model, None, &prompt, &config, drafter.as_mut(), |_| ())?;
            let rate = generation.ids.len() as f64 / start.elapsed().as_secs_f64();
            let drafter = drafter.expect("speculating");
            let (drafted, accepted) = counts.get();
            counts.set((drafted + drafter.drafted, accepted + drafter.accepted));
            Ok(rate)
        };
        run()?;
        counts.set((0, 0));
        let rate = measure(run, args.repetitions)?;
        results.push(("sg", args.n_gen, rate));
        speculative = Some(counts.get());
    }

    let size = std::fs::metadata(&args.model).map(|m| m.len()).unwrap_or(0);
    let weight_bytes = model.weight_bytes_per_step();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut out = json!({
            "model": args.model.display().to_string(),
            "lora": args.lora.lora.as_ref().map(|dir| dir.display().to_string()),
            "threads": threads,
            "reps": args.repetitions,
            "weight_bytes_per_token": weight_bytes,
            "cpu": cpu_report(),
            "layouts": model.layouts(),
            "load_s": load_s,
        });
        for (test, tokens, (mean, sd)) in &results {
            out[format!("{test}_tps")] = json!(mean);
            out[format!("{test}_sd")] = json!(sd);
            out[if *test == "pp" { "p" } else { "n" }] = json!(tokens);
        }
        if let Some((_, _, (tg, _))) = results.iter().find(|r| r.0 == "tg") {
            out["tg_weight_gb_per_s"] = json!(tg * weight_bytes as f64 / 1e9);
        }
        if !verify.is_empty() {
            out["verify_context"] = json!(VERIFY_CONTEXT);
            out["verify"] =
                verify.iter().map(|(k, (mean, sd))| json!({"k": k, "passes_per_s": mean, "sd": sd})).collect();
        }
        if let Some((drafted, accepted)) = speculative {
            out["speculation"] = json!({
                "guesser": if draft.is_some() { "draft-model" } else { "lookup" },
                "draft_max": args.speculative.draft_max,
                "drafted_tokens": drafted,
                "accepted_tokens": accepted,
            });
        }
        writeln!(stdout, "{out}")?;
        return Ok(());
    }
    writeln!(stdout, "| model | size | threads | test | t/s | weights read |")?;
    writeln!(stdout, "|---|---:|---:|---|---:|---:|")?;
    let name = args.model.file_name().map_or_else(|| args.model.display().to_string(), |n| n.to_string_lossy().into());
    for (test, tokens, (mean, sd)) in &results {
        let read = if *test == "tg" { format!("{:.1} GB/s", mean * weight_bytes as f64 / 1e9) } else { "-".into() };
        writeln!(
            stdout,
            "| {name} | {:.2} GiB | {threads} | {test}{tokens} | {mean:.2} ± {sd:.2} | {read} |",
            size as f64 / (1u64 << 30) as f64
        )?;
    }
    if let Some((drafted, accepted)) = speculative {
        let kept = if drafted == 0 { 0.0 } else { 100.0 * accepted as f64 / drafted as f64 };
        writeln!(stdout, "\nsg: {accepted} of {drafted} guessed tokens kept ({kept:.0}%)")?;
    }
    if let Some((_, (one, _))) = verify.first() {
        writeln!(stdout, "\n| verify rows k | passes/s | ms per pass | cost vs k = 1 |")?;
        writeln!(stdout, "|---:|---:|---:|---:|")?;
        for (k, (mean, sd)) in &verify {
            writeln!(stdout, "| {k} | {mean:.2} ± {sd:.2} | {:.2} | {:.2}× |", 1e3 / mean, one / mean)?;
        }
    }
    let cpu = cpu_report();
    let layouts: Vec<String> = model.layouts().into_iter().map(|(layout, n)| format!("{n} {layout}")).collect();
    writeln!(
        stdout,
        "\nCPU: {} ({} family {} model {}); kernels: {}, prefetch {} ({}), {} for packed layouts, AMX tiles {}; \
         matrices: {}; model loaded in {load_s:.2} s",
        cpu["brand"].as_str().unwrap_or_default(),
        cpu["vendor"].as_str().unwrap_or_default(),
        cpu["family"],
        cpu["model"],
        cpu["isa"].as_str().unwrap_or_default(),
        cpu["prefetch"].as_str().unwrap_or_default(),
        cpu["prefetch_source"].as_str().unwrap_or_default(),
        cpu["packed_prefetch"].as_str().unwrap_or_default(),
        if cpu["amx"] == true { "on" } else { "off" },
        layouts.join(", "),
    )?;
    Ok(())
}

/// The CPU and the kernel choices made for it, for `--json` reports: results are only comparable on the same CPU.
fn cpu_report() -> serde_json::Value {
    let tuning = vicuna_kernels::Tuning::get();
    let cpu = &tuning.cpu;
    json!({
        "brand": cpu.brand,
        "vendor": cpu.vendor,
        "family": cpu.family,
        "model": cpu.model,
        "isa": format!("{:?}", vicuna_kernels::Isa::detect()).to_lowercase(),
        "prefetch": tuning.prefetch.name(),
        "prefetch_source": tuning.prefetch_source,
        "packed_prefetch": tuning.packed_prefetch.name(),
        "pack": tuning.pack.types(vicuna_kernels::Isa::detect()).iter().map(|ty| ty.name()).collect::<Vec<_>>(),
        "amx": tuning.amx,
    })
}

/// `reps` runs of `run` (tokens per second each): mean and sample standard deviation.
fn measure(mut run: impl FnMut() -> Result<f64>, reps: usize) -> Result<(f64, f64)> {
    let rates = (0..reps).map(|_| run()).collect::<Result<Vec<f64>>>()?;
    let mean = rates.iter().sum::<f64>() / reps as f64;
    let var = if reps > 1 { rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (reps - 1) as f64 } else { 0.0 };
    Ok((mean, var.sqrt()))
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The adapter applies to --model only (the reference runs without it: its KL divergence is the adapter's and
    /// the quantization's effect together).
    #[command(flatten)]
    pub lora: LoraArgs,
    /// The text to measure on (UTF-8), e.g. wikitext-2's wiki.test.raw.
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Also compare with --reference-model: KL divergence and top-1 agreement at every scored token.
    #[arg(long, requires = "reference_model")]
    pub kl_divergence: bool,
    /// The full-precision model to compare with (a GGUF file or a Hugging Face folder). It runs first, alone.
    #[arg(long, requires = "kl_divergence")]
    pub reference_model: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_perplexity(args: PerplexityArgs, threads: Option<usize>) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    let text = std::fs::read(&args.file).map_err(|e| format!("cannot read --file {}: {e}", args.file.display()))?;
    let text = String::from_utf8(text).map_err(|e| {
        format!(
            "--file {} is not UTF-8 text (bad byte at offset {})",
            args.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let tokens = tokenizer.encode(&text, true);
    let mut chunks = perplexity_chunks(&tokens, args.ctx, tokenizer.bos_id())?;
    chunks.truncate(args.chunks.unwrap_or(usize::MAX).max(1));
    let threads = compute_threads(threads);

    // The reference first, on its own: its log-probabilities are kept, and its weights dropped before the
    // model under test loads.
    let reference = match &args.reference_model {
        Some(path) => {
            let reference = QuantLlama::load(path, threads)?;
            check_fits(&reference, &tokenizer, args.ctx, path)?;
            let mut rows = Vec::with_capacity(chunks.len());
            for (i, chunk) in chunks.iter().enumerate() {
                rows.push(ChunkLogProbs::compute(&reference, chunk)?);
                eprintln!("reference: chunk {}/{}", i + 1, chunks.len());
            }
            Some(rows)
        }
        None => None,
    };
    let mut model = QuantLlama::load(&args.model.model, threads)?;
    args.lora.apply(&mut model)?;
    check_fits(&model, &tokenizer, args.ctx, &args.model.model)?;
    let mut stats = PerplexityStats::default();
    let start = Instant::now();
    for (i, chunk) in chunks.iter().enumerate() {
        let scored = ChunkLogProbs::compute(&model, chunk)?;
        stats.add(&scored, reference.as_ref().map(|r| &r[i]))?;
        eprintln!("chunk {}/{}: perplexity so far {:.4}", i + 1, chunks.len(), stats.perplexity());
    }
    let seconds = start.elapsed().as_secs_f64();

    let mut stdout = std::io::stdout().lock();
    let divergence = stats.divergence();
    if args.json {
        let mut out = json!({
            "model": args.model.model.display().to_string(),
            "ctx": args.ctx,
            "chunks": chunks.len(),
            "scored_tokens": stats.tokens,
            "perplexity": stats.perplexity(),
            "perplexity_error": stats.perplexity_error(),
            "seconds": seconds,
        });
        if let Some(d) = divergence {
            out["reference_model"] = json!(args.reference_model.as_ref().map(|p| p.display().to_string()));
            out["reference_perplexity"] = json!(d.reference_perplexity);
            out["mean_kld"] = json!(d.mean_kld);
            out["mean_kld_error"] = json!(d.mean_kld_error);
            out["max_kld"] = json!(d.max_kld);
            out["top1_agreement"] = json!(d.top1_agreement);
        }
        writeln!(stdout, "{out}")?;
        return Ok(());
    }
    writeln!(
        stdout,
        "perplexity: {:.4} ± {:.4} ({} scored tokens in {} chunks of {}; {seconds:.1} s)",
        stats.perplexity(),
        stats.perplexity_error(),
        stats.tokens,
        chunks.len(),
        args.ctx
    )?;
    if let Some(d) = divergence {
        writeln!(stdout, "reference perplexity: {:.4}", d.reference_perplexity)?;
        writeln!(
            stdout,
            "mean KL divergence: {:.6} ± {:.6} nats (max {:.6})",
            d.mean_kld, d.mean_kld_error, d.max_kld
        )?;
        writeln!(stdout, "same top-1 token: {:.3} %", 100.0 * d.top1_agreement)?;
    }
    Ok(())
}

/// The chunks must fit the model's context, and the tokenizer its vocabulary.
fn check_fits(model: &QuantLlama, tokenizer: &vicuna_tokenizer::Tokenizer, ctx: usize, path: &Path) -> Result<()> {
    let context = model.config().max_position_embeddings;
    if ctx > context {
        return Err(format!("--ctx {ctx} is longer than the context of {} ({context})", path.display()).into());
    }
    Ok(vicuna_engine::check_tokenizer_fits(tokenizer, model.config().vocab_size, &path.display().to_string())?)
}
