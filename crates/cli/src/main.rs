//! `vicuna`: the command line. Each subcommand parses its flags, calls the libraries, and prints
//! data on stdout; logs and errors go to stderr. Bad input exits with code 2 and one line saying
//! what is wrong.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vicuna_engine::{generate, random_seed, score, GenerationConfig, SamplingParams};
use vicuna_model::candle_core::Device;
use vicuna_model::Llama;
use vicuna_tokenizer::Tokenizer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(name = "vicuna", version, about = "StableVicuna in one binary: run, score and tokenize LLaMA models")]
struct Cli {
    /// Worker threads for tensor math (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Teacher-forced log-probability of every token, and perplexity.
    Score(ScoreArgs),
    /// Turn text into token ids.
    Tokenize(TokenizeArgs),
    /// Turn token ids into text.
    Detokenize(DetokenizeArgs),
}

/// Where the model and its tokenizer come from.
#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json plus safetensors or PyTorch .bin weights).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer file (tokenizer.model or tokenizer.json) to use instead of the folder's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        Ok(match &self.tokenizer {
            Some(file) => Some(Tokenizer::from_file(file)?),
            None => Tokenizer::from_dir(&self.model)?,
        })
    }

    fn require_tokenizer(&self) -> Result<Tokenizer> {
        self.tokenizer()?.ok_or_else(|| missing_tokenizer(&self.model))
    }

    fn load_model(&self) -> Result<Llama> {
        let start = std::time::Instant::now();
        let model = Llama::load(&self.model, &Device::Cpu)?;
        tracing::info!("loaded {} in {:.2?}", self.model.display(), start.elapsed());
        Ok(model)
    }
}

/// The input text or ids of a command.
#[derive(Args)]
struct InputArgs {
    /// Token ids, comma separated, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    ids: Option<Vec<u32>>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; BOS is prepended.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    #[command(flatten)]
    input: InputArgs,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// EOS cannot end the text before this many new tokens.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Locally typical sampling mass (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    typical_p: f32,
    /// Penalize tokens already present (1.0 = off), as transformers does.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when this text appears (may be repeated); it is trimmed from the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Random seed; the same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Always pick the most likely token (no sampling).
    #[arg(long)]
    greedy: bool,
    /// Do not stop at EOS.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object {"ids", "text", "finish_reason"} instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to score; BOS is prepended.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    text: Option<String>,
    #[command(flatten)]
    input: InputArgs,
    #[arg(long)]
    json: bool,
    /// Also print the whole logits vector at the last position.
    #[arg(long)]
    full_logits: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    text: String,
    /// Do not prepend BOS.
    #[arg(long)]
    no_bos: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DetokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    ids: Vec<u32>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VICUNA_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle sizes its CPU thread pool from this variable; set before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    let result = match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Score(args) => run_score(args),
        Command::Tokenize(args) => run_tokenize(args),
        Command::Detokenize(args) => run_detokenize(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn missing_tokenizer(model: &Path) -> Box<dyn std::error::Error> {
    format!(
        "{} has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer FILE, or give --ids",
        model.display()
    )
    .into()
}

/// The ids to run: `--ids` as given, or the text encoded with BOS.
fn input_ids(text: Option<&str>, ids: Option<Vec<u32>>, tokenizer: Option<&Tokenizer>, model: &Path) -> Result<Vec<u32>> {
    match (text, ids) {
        (_, Some(ids)) => Ok(ids),
        (Some(text), None) => match tokenizer {
            Some(t) => Ok(t.encode(text, true)),
            None => Err(missing_tokenizer(model)),
        },
        (None, None) => Err("give the input as text or as --ids".into()),
    }
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let tokenizer = args.model.tokenizer()?;
    let prompt = input_ids(args.prompt.as_deref(), args.input.ids, tokenizer.as_ref(), &args.model.model)?;
    let sampling = SamplingParams {
        do_sample: !args.greedy,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        typical_p: args.typical_p,
        repetition_penalty: args.repetition_penalty,
    };
    sampling.validate()?;
    let config = GenerationConfig {
        sampling,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        stop: args.stop,
        ignore_eos: args.ignore_eos,
        seed: args.seed.unwrap_or_else(random_seed),
    };
    let model = args.model.load_model()?;
    let mut stdout = std::io::stdout().lock();
    let start = std::time::Instant::now();
    let stream = !args.json;
    let generation = generate(&model, tokenizer.as_ref(), &prompt, &config, |piece| {
        if stream {
            // A closed pipe (e.g. `| head`) is not worth a panic; the generation just goes unread.
            let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
        }
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    tracing::info!(
        "{} tokens in {elapsed:.2}s ({:.1} tokens/s, prompt included)",
        generation.ids.len(),
        generation.ids.len() as f64 / elapsed
    );
    if args.json {
        let out = json!({
            "ids": generation.ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason.as_str(),
        });
        writeln!(stdout, "{out}")?;
    } else if generation.text.is_some() {
        writeln!(stdout)?;
    } else {
        let ids: Vec<String> = generation.ids.iter().map(|id| id.to_string()).collect();
        writeln!(stdout, "{}", ids.join(","))?;
    }
    Ok(())
}

fn run_score(args: ScoreArgs) -> Result<()> {
    let tokenizer = args.model.tokenizer()?;
    let ids = input_ids(args.text.as_deref(), args.input.ids, tokenizer.as_ref(), &args.model.model)?;
    let model = args.model.load_model()?;
    let scored = score(&model, &ids)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut out = json!({ "ids": ids, "logprobs": scored.logprobs, "perplexity": scored.perplexity });
        if args.full_logits {
            out["last_logits"] = json!(scored.last_logits);
        }
        writeln!(stdout, "{out}")?;
        return Ok(());
    }
    for (id, logprob) in ids.iter().zip(&scored.logprobs) {
        let piece = tokenizer.as_ref().and_then(|t| t.id_to_piece(*id).map(str::to_string)).unwrap_or_default();
        match logprob {
            Some(lp) => writeln!(stdout, "{id}\t{piece}\t{lp:.6}")?,
            None => writeln!(stdout, "{id}\t{piece}\t-")?,
        }
    }
    match scored.perplexity {
        Some(p) => writeln!(stdout, "perplexity {p:.6}")?,
        None => writeln!(stdout, "perplexity - (one token: nothing to score)")?,
    }
    if args.full_logits {
        writeln!(stdout, "last_logits {}", json!(scored.last_logits))?;
    }
    Ok(())
}

fn run_tokenize(args: TokenizeArgs) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    let ids = tokenizer.encode(&args.text, !args.no_bos);
    let pieces = tokenizer.pieces(&ids);
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", json!({ "ids": ids, "pieces": pieces }))?;
    } else {
        for (id, piece) in ids.iter().zip(&pieces) {
            writeln!(stdout, "{id}\t{piece}")?;
        }
    }
    Ok(())
}

fn run_detokenize(args: DetokenizeArgs) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    if let Some(&bad) = args.ids.iter().find(|&&id| id as usize >= tokenizer.vocab_size()) {
        return Err(format!("token id {bad} is outside the vocabulary (0..{})", tokenizer.vocab_size()).into());
    }
    writeln!(std::io::stdout().lock(), "{}", tokenizer.decode(&args.ids))?;
    Ok(())
}
