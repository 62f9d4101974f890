//! `vicuna`: the command line. Each subcommand parses its flags, calls the libraries, and prints
//! data on stdout; logs and errors go to stderr. Bad input exits with code 2 and one line saying
//! what is wrong. One module per group of commands.

mod chat;
mod common;
mod delta;
mod gguf_vocab;
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
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle sizes its CPU thread pool from this variable; set before any tensor work.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    let result = match cli.command {
        Command::Generate(args) => inference::run_generate(args, cli.threads),
        Command::Score(args) => inference::run_score(args, cli.threads),
        Command::Tokenize(args) => tokens::run_tokenize(args),
        Command::Detokenize(args) => tokens::run_detokenize(args),
        Command::ApplyDelta(args) => delta::run_apply_delta(args, cli.threads),
        Command::MakeDelta(args) => delta::run_make_delta(args, cli.threads),
        Command::Synth(args) => synth::run_synth_command(args, cli.threads),
        Command::Quantize(args) => quantize::run_quantize_command(args, cli.threads),
        Command::Bench(args) => measure::run_bench(args, cli.threads),
        Command::Perplexity(args) => measure::run_perplexity(args, cli.threads),
        Command::Serve(args) => serve::run_serve(args, cli.threads),
        Command::Chat(args) => chat::run_chat(args, cli.threads),
        Command::Train(args) => train::run_train(args),
        Command::Reward(args) => train::run_reward(args),
        Command::Plot(args) => train::run_plot(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
