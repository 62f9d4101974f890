//! `vicuna tokenize` and `vicuna detokenize`.

use std::io::Write;

use clap::Args;
use serde_json::json;

use crate::common::ModelArgs;
use crate::Result;

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub text: String,
    /// Do not prepend BOS.
    #[arg(long)]
    pub no_bos: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DetokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    pub ids: Vec<u32>,
}

pub fn run_tokenize(args: TokenizeArgs) -> Result<()> {
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

pub fn run_detokenize(args: DetokenizeArgs) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    if let Some(&bad) = args.ids.iter().find(|&&id| id as usize >= tokenizer.vocab_size()) {
        return Err(format!("token id {bad} is outside the vocabulary (0..{})", tokenizer.vocab_size()).into());
    }
    writeln!(std::io::stdout().lock(), "{}", tokenizer.decode(&args.ids))?;
    Ok(())
}
