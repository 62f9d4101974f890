//! `vicuna`: the command line. Each subcommand parses its flags, calls the libraries, and prints
//! data on stdout; logs and errors go to stderr. Bad input exits with code 2 and one line saying
//! what is wrong. One module per group of commands.

mod chat;
mod common;
mod delta;
mod inference;
mod measure;
mod output;
mod quantize;
mod serve;
mod synth;
mod tokens;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(name = "vicuna", version, about = "StableVicuna in one binary: run, score and tokenize LLaMA models")]
struct Cli {
    /// Worker threads for tensor math (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streamed to stdout.
    Generate(inference::GenerateArgs),
    /// Teacher-forced log-probability of every token, and perplexity.
    Score(inference::ScoreArgs),
    /// Turn text into token ids.
    Tokenize(tokens::TokenizeArgs),
    /// Turn token ids into text.
    Detokenize(tokens::DetokenizeArgs),
    /// Add a delta to its base model (StableVicuna = LLaMA-13B + delta), in bounded memory.
    ApplyDelta(delta::ApplyDeltaArgs),
    /// Make a delta (fine-tuned − base) to publish a fine-tune without the base's weights.
    MakeDelta(delta::MakeDeltaArgs),
    /// Write a LLaMA folder of a real shape with random weights, for tests and benchmarks.
    Synth(synth::SynthArgs),
    /// Write a GGUF file (f32, f16, q8_0, q4_0, q4_k_m) that llama.cpp loads.
    Quantize(quantize::QuantizeArgs),
    /// Prompt and generation speed, as llama-bench measures them (pp / tg tokens per second).
    Bench(measure::BenchArgs),
    /// Perplexity on a text, and with --kl-divergence the divergence from a reference model.
    Perplexity(measure::PerplexityArgs),
    /// Serve the model over HTTP: TGI and OpenAI APIs with continuous batching, and a chat page.
    Serve(serve::ServeArgs),
    /// Chat with the model in the terminal (one reply per input line when stdin is not a terminal).
    Chat(chat::ChatArgs),
    /// Fine-tune: `train sft` (supervised, LoRA optional), `train rm` (reward model), `train ppo`.
    Train(train::TrainArgs),
    /// Score text with a reward model.
    Reward(train::RewardArgs),
    /// Draw a PPO run's metrics.jsonl as a PNG of curves.
    Plot(train::PlotArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VICUNA_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let mut cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle sizes its CPU thread pool from this variable; set before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    let result = resolve_hub_ids(&mut cli.command).and_then(|()| run(cli.command, cli.threads));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Hugging Face Hub ids among a command's model inputs become local paths (from the Hugging Face cache,
/// downloaded into it when missing: `common::resolve_input`) before it runs; output paths stay as given. Every
/// command is listed (no catch-all), so a new one has to say which of its inputs are models.
fn resolve_hub_ids(command: &mut Command) -> Result<()> {
    use common::{resolve_input, resolve_optional, resolve_tokenizer};
    use vicuna_weights::hub::HubKind::{Model, Tokenizer};
    match command {
        Command::Generate(a) => {
            a.model.resolve_ids(Model)?;
            a.lora.resolve_ids()?;
            a.speculative.resolve_ids()
        }
        Command::Score(a) => {
            a.model.resolve_ids(Model)?;
            a.lora.resolve_ids()
        }
        // Only the tokenizer is used: only its files are fetched.
        Command::Tokenize(a) => a.model.resolve_ids(Tokenizer),
        Command::Detokenize(a) => a.model.resolve_ids(Tokenizer),
        Command::ApplyDelta(a) => {
            resolve_input("--base", &mut a.base, Model, a.write.quiet)?;
            resolve_input("--delta", &mut a.delta, Model, a.write.quiet)
        }
        // make-delta's --target is its fine-tuned input; --delta is the output.
        Command::MakeDelta(a) => {
            resolve_input("--base", &mut a.base, Model, a.write.quiet)?;
            resolve_input("--target", &mut a.target, Model, a.write.quiet)
        }
        Command::Synth(a) => resolve_tokenizer("--tokenizer", &mut a.tokenizer),
        Command::Quantize(a) => {
            resolve_input("--model", &mut a.model, Model, a.quiet)?;
            resolve_tokenizer("--tokenizer", &mut a.tokenizer)
        }
        Command::Bench(a) => {
            resolve_input("--model", &mut a.model, Model, false)?;
            a.lora.resolve_ids()
        }
        Command::Perplexity(a) => {
            a.model.resolve_ids(Model)?;
            a.lora.resolve_ids()?;
            resolve_optional("--reference-model", &mut a.reference_model, Model)
        }
        Command::Serve(a) => {
            let given = a.model.model.clone();
            a.model.resolve_ids(Model)?;
            if a.model_id.is_none() && a.model.model != given {
                // Served under its Hub id, as TGI and vLLM report it, not its snapshot's commit hash.
                a.model_id = Some(given.to_string_lossy().into_owned());
            }
            for (_, dir) in &mut a.loras {
                resolve_input("--lora", dir, Model, false)?;
            }
            a.speculative.resolve_ids()
        }
        Command::Chat(a) => {
            a.model.resolve_ids(Model)?;
            a.lora.resolve_ids()?;
            a.speculative.resolve_ids()
        }
        Command::Train(a) => match &mut a.stage {
            train::Stage::Sft(a) => a.model.resolve_ids(Model),
            train::Stage::Rm(a) => a.model.resolve_ids(Model),
            // Its model paths come from its YAML settings and flags together: resolved in `run_ppo`.
            train::Stage::Ppo(_) => Ok(()),
        },
        Command::Reward(a) => {
            resolve_input("--model", &mut a.model, Model, false)?;
            resolve_tokenizer("--tokenizer", &mut a.tokenizer)
        }
        Command::Plot(_) => Ok(()),
    }
}

fn run(command: Command, threads: Option<usize>) -> Result<()> {
    match command {
        Command::Generate(args) => inference::run_generate(args, threads),
        Command::Score(args) => inference::run_score(args, threads),
        Command::Tokenize(args) => tokens::run_tokenize(args),
        Command::Detokenize(args) => tokens::run_detokenize(args),
        Command::ApplyDelta(args) => delta::run_apply_delta(args, threads),
        Command::MakeDelta(args) => delta::run_make_delta(args, threads),
        Command::Synth(args) => synth::run_synth_command(args, threads),
        Command::Quantize(args) => quantize::run_quantize_command(args, threads),
        Command::Bench(args) => measure::run_bench(args, threads),
        Command::Perplexity(args) => measure::run_perplexity(args, threads),
        Command::Serve(args) => serve::run_serve(args, threads),
        Command::Chat(args) => chat::run_chat(args, threads),
        Command::Train(args) => train::run_train(args),
        Command::Reward(args) => train::run_reward(args),
        Command::Plot(args) => train::run_plot(args),
    }
}
