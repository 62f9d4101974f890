//! `vicuna generate` and `vicuna score`.

use std::io::Write;

use clap::Args;
use serde_json::json;
use vicuna_engine::{generate_speculative, random_seed, score, Context, GenerationConfig, Grammar, GrammarSpec};

use crate::common::{input_ids, InputArgs, LoraArgs, ModelArgs, SamplingArgs, SpeculativeArgs};
use crate::Result;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// The prompt; BOS is prepended.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    /// EOS cannot end the text before this many new tokens.
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Stop when this text appears (may be repeated); it is trimmed from the output.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at EOS.
    #[arg(long, conflicts_with_all = ["json_schema", "regex", "lark"])]
    pub ignore_eos: bool,
    /// Structured output: the text is JSON valid under this JSON schema (a file, or the schema itself).
    #[arg(long, value_name = "FILE|JSON", conflicts_with_all = ["regex", "lark"])]
    pub json_schema: Option<String>,
    /// Structured output: the whole text matches this regular expression.
    #[arg(long, conflicts_with = "lark")]
    pub regex: Option<String>,
    /// Structured output: the text follows this Lark grammar (llguidance's format; a file).
    #[arg(long, value_name = "FILE")]
    pub lark: Option<std::path::PathBuf>,
    /// Print one JSON object {"ids", "text", "finish_reason"} instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Text to score; BOS is prepended.
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub text: Option<String>,
    #[command(flatten)]
    pub input: InputArgs,
    #[arg(long)]
    pub json: bool,
    /// Also print the whole logits vector at the last position.
    #[arg(long)]
    pub full_logits: bool,
}

pub fn run_generate(args: GenerateArgs, threads: Option<usize>) -> Result<()> {
    let (mut model, tokenizer) = args.model.load(threads)?;
    args.lora.apply(&mut model)?;
    let grammar = grammar(&args, tokenizer.as_ref())?;
    let prompt = input_ids(args.prompt.as_deref(), args.input.ids, tokenizer.as_ref(), &args.model.model)?;
    let config = GenerationConfig {
        sampling: args.sampling.to_params(model.config().vocab_size)?,
        max_new_tokens: args.sampling.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        stop: args.stop,
        ignore_eos: args.ignore_eos,
        seed: args.sampling.seed.unwrap_or_else(random_seed),
        top_logprobs: 0,
        grammar,
    };
    let draft = args.speculative.load_draft(threads)?;
    let mut drafter = args.speculative.drafter(draft.as_ref(), &model, &config.sampling, config.seed)?;
    let mut stdout = std::io::stdout().lock();
    let start = std::time::Instant::now();
    let stream = !args.json;
    // The first callback marks the end of the prompt's pass.
    let mut first_token_at = None;
    let mut context = Context::new(&model);
    let generation =
        generate_speculative(&mut context, &model, tokenizer.as_ref(), &prompt, &config, drafter.as_mut(), |piece| {
            first_token_at.get_or_insert_with(std::time::Instant::now);
            if stream {
                // A closed pipe (e.g. `| head`) is not worth a panic; the generation just goes unread.
                let _ = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush());
            }
        })?;
    if let Some(first) = first_token_at {
        let prefill = (first - start).as_secs_f64();
        let decode = first.elapsed().as_secs_f64();
        let decoded = generation.ids.len().saturating_sub(1);
        tracing::info!(
            "prompt: {} tokens in {prefill:.3}s ({:.1} tokens/s); generation: {decoded} more tokens in {decode:.3}s ({:.1} tokens/s)",
            prompt.len(),
            prompt.len() as f64 / prefill,
            decoded as f64 / decode
        );
    }
    if let Some(d) = &drafter {
        tracing::info!("speculative decoding: {} of {} guessed tokens kept", d.accepted, d.drafted);
    }
    if args.json {
        let mut out = json!({
            "ids": generation.ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason.as_str(),
        });
        if let Some(d) = &drafter {
            out["drafted_tokens"] = json!(d.drafted);
            out["accepted_tokens"] = json!(d.accepted);
        }
        writeln!(stdout, "{out}")?;
    } else if generation.text.is_some() {
        writeln!(stdout)?;
    } else {
        let ids: Vec<String> = generation.ids.iter().map(|id| id.to_string()).collect();
        writeln!(stdout, "{}", ids.join(","))?;
    }
    Ok(())
}

pub fn run_score(args: ScoreArgs, threads: Option<usize>) -> Result<()> {
    let (mut model, tokenizer) = args.model.load(threads)?;
    args.lora.apply(&mut model)?;
    let ids = input_ids(args.text.as_deref(), args.input.ids, tokenizer.as_ref(), &args.model.model)?;
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

/// The grammar `--json-schema`, `--regex` or `--lark` asks for, compiled for the tokenizer.
fn grammar(
    args: &GenerateArgs,
    tokenizer: Option<&vicuna_tokenizer::Tokenizer>,
) -> Result<Option<std::sync::Arc<Grammar>>> {
    let spec = if let Some(schema) = &args.json_schema {
        let text = if schema.trim_start().starts_with('{') {
            schema.clone()
        } else {
            std::fs::read_to_string(schema).map_err(|e| format!("--json-schema {schema}: {e}"))?
        };
        let value = serde_json::from_str(&text).map_err(|e| format!("--json-schema: not JSON: {e}"))?;
        GrammarSpec::JsonSchema(value)
    } else if let Some(regex) = &args.regex {
        GrammarSpec::Regex(regex.clone())
    } else if let Some(path) = &args.lark {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--lark {}: {e}", path.display()))?;
        GrammarSpec::Lark(text)
    } else {
        return Ok(None);
    };
    let Some(tokenizer) = tokenizer else {
        return Err("structured output needs a tokenizer: the model has none; give --tokenizer FILE".into());
    };
    Ok(Some(Grammar::compile(tokenizer, &spec)?))
}
