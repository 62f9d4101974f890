//! `vicuna`: the command line. Each subcommand parses its flags, calls the libraries, and prints
//! data on stdout; logs and errors go to stderr. Bad input exits with code 2 and one line saying
//! what is wrong. One module per group of commands.

mod common;
mod inference;
mod tokens;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Generate(inference::GenerateArgs),
    /// Teacher-forced log-probability of every token, and perplexity.
    Score(inference::ScoreArgs),
    /// Turn text into token ids.
    Tokenize(tokens::TokenizeArgs),
    /// Turn token ids into text.
    Detokenize(tokens::DetokenizeArgs),
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
        Command::Generate(args) => inference::run_generate(args),
        Command::Score(args) => inference::run_score(args),
        Command::Tokenize(args) => tokens::run_tokenize(args),
        Command::Detokenize(args) => tokens::run_detokenize(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
