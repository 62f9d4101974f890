//! `vicuna serve`: the TGI- and OpenAI-compatible HTTP server (crate `vicuna-server`).

use std::time::Duration;

use clap::Args;
use vicuna_server::ServerOptions;

use crate::common::{ModelArgs, SpeculativeArgs};
use crate::Result;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    /// Address to listen on (loopback by default: pass 0.0.0.0 to open it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one. The address is printed on stdout once ready.
    #[arg(long, default_value_t = 3000)]
    pub port: u16,
    /// Requests in flight (queued or running) before new ones get 429.
    #[arg(long, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Most requests in one batch (default: as many as the KV budget allows).
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Longest prompt, in tokens (default: --max-total-tokens minus 1).
    #[arg(long)]
    pub max_input_tokens: Option<usize>,
    /// Longest prompt in bytes, refused (422) before it is tokenized, so that a huge prompt costs no
    /// tokenizer time or memory (default: --max-input-tokens times the longest token of the
    /// vocabulary in bytes, 27 for LLaMA's: never refuses a prompt that fits in tokens). Also
    /// caps /tokenize.
    #[arg(long)]
    pub max_input_bytes: Option<usize>,
    /// Longest prompt plus generated tokens of one request.
    #[arg(long, default_value_t = 2048)]
    pub max_total_tokens: usize,
    /// KV-cache budget in tokens across the batch; a request reserves its prompt plus
    /// max_new_tokens and waits until that fits (default: 4 GiB of cache, a --draft-model's cache
    /// included, at most max-concurrent-requests × max-total-tokens).
    #[arg(long)]
    pub max_batch_total_tokens: Option<usize>,
    /// Prompt tokens read per step: longer prompts are read in chunks of this size between the
    /// decoding steps of the other requests.
    #[arg(long, default_value_t = 512)]
    pub max_batch_prefill_tokens: usize,
    /// Most stop sequences one request may give.
    #[arg(long, default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health and the chat page
    /// (default: the VICUNA_API_KEY environment variable, if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Seconds running requests get to finish after SIGTERM before they are cancelled. While they
    /// finish (the drain), /health answers 503 and new generation requests get 503; then the port
    /// closes and the server exits.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Do not keep computed KV blocks for later requests (by default every full block of a prompt
    /// and reply is kept, and a request that starts with the same tokens reads only the rest).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Most KV blocks (of 16 positions) the prefix cache keeps (default: whatever of the KV budget
    /// running requests leave; least recently used blocks go first).
    #[arg(long)]
    pub prefix_cache_blocks: Option<usize>,
    /// Seconds a connection may take to send a request's head (request line and headers), and
    /// that an idle kept-alive connection stays open; then it is closed (slow or stalled clients
    /// cannot hold connections forever).
    #[arg(long, default_value_t = vicuna_server::DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub header_read_timeout: u64,
    /// Let browser pages from ORIGIN (`https://host[:port]`) call the API: preflights are answered
    /// (without the API key) and responses carry `Access-Control-Allow-Origin`. Repeat for more
    /// origins; `*` allows any. Without it, no CORS headers are sent.
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    pub cors_allow_origins: Vec<String>,
    /// The model name the API reports (default: the model folder's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Also serve the LoRA adapter in DIR (a PEFT folder, or its Hugging Face Hub id: adapter_config.json and
    /// adapter_model.safetensors, as `vicuna train sft --lora-rank R` writes) under NAME, on the same
    /// base weights: requests pick it by OpenAI's `model` or TGI's `parameters.adapter_id`, and one
    /// batch mixes adapters and the base. Repeatable; more can be loaded at run time with
    /// POST /v1/load_lora_adapter.
    #[arg(long = "lora", value_name = "NAME=DIR", value_parser = parse_lora)]
    pub loras: Vec<(String, std::path::PathBuf)>,
    /// Most distinct adapters in one running batch; a request for another waits until one is done.
    #[arg(long, default_value_t = vicuna_server::DEFAULT_MAX_LORAS)]
    pub max_loras: usize,
}

/// `NAME=DIR` of `--lora`.
fn parse_lora(text: &str) -> std::result::Result<(String, std::path::PathBuf), String> {
    match text.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), dir.into())),
        _ => Err(format!("{text:?} is not NAME=DIR (e.g. --lora sql=adapters/sql)")),
    }
}

pub fn run_serve(args: ServeArgs, threads: Option<usize>) -> Result<()> {
    let listener = vicuna_server::bind(&args.host, args.port).map_err(|e| e.to_string())?;
    let (model, tokenizer) = args.model.load_with_tokenizer(threads)?;
    let draft = args.speculative.load_draft(threads)?;
    let limits = args.speculative.limits()?;
    let speculation = args
        .speculative
        .speculates()
        .then(|| vicuna_server::Speculation { draft_model: draft.map(std::sync::Arc::new), limits });
    let model_id = args.model_id.unwrap_or_else(|| {
        let folder = args.model.model.canonicalize().unwrap_or_else(|_| args.model.model.clone());
        folder.file_name().map_or_else(|| "vicuna".into(), |name| name.to_string_lossy().into_owned())
    });
    let api_key = args.api_key.or_else(|| std::env::var("VICUNA_API_KEY").ok()).filter(|k| !k.is_empty());
    let options = ServerOptions {
        model_id,
        max_concurrent_requests: args.max_concurrent_requests,
        max_batch_size: args.max_batch_size,
        max_input_tokens: args.max_input_tokens,
        max_input_bytes: args.max_input_bytes,
        max_total_tokens: args.max_total_tokens,
        max_batch_total_tokens: args.max_batch_total_tokens,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens,
        max_stop_sequences: args.max_stop_sequences,
        api_key,
        payload_limit: args.payload_limit,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        prefix_cache: !args.no_prefix_cache,
        prefix_cache_blocks: args.prefix_cache_blocks,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        cors_allow_origins: args.cors_allow_origins,
        loras: args.loras,
        max_loras: args.max_loras,
        speculation,
    };
    vicuna_server::serve_on(listener, model, tokenizer, options, vicuna_server::shutdown_signal())
        .map_err(|e| e.to_string())?;
    Ok(())
}
