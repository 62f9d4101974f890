//! `vicuna serve`: a Text Generation Inference- and OpenAI-compatible HTTP server over one model,
//! with continuous batching, plus the StableVicuna chat template shared with `vicuna chat`.
//!
//! The pieces follow TGI's router: [`validation`] turns a request into token ids and a
//! `GenerationConfig`; the [`scheduler`] thread queues, batches and runs them; [`tgi`] and
//! [`openai`] shape the answers; [`http`] holds the routes, the API-key guard and the glue.

pub mod adapters;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod http;
mod metrics;
mod openai;
pub mod scheduler;
mod tgi;
mod tokens;
pub mod validation;

/// The conversation format lives in the engine (training renders with it too); served from here as before.
pub use vicuna_engine::template;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use vicuna_engine::{DraftLimits, DraftSource, SamplingParams};
use vicuna_model::{QuantLlama, BLOCK_TOKENS};
use vicuna_tokenizer::Tokenizer;

use crate::adapters::Adapters;
use crate::http::{unix_time, AppState, Cors};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::validation::{Limits, MAX_CHOICES};

/// Default KV budget when `--max-batch-total-tokens` is not given: this much cache memory (keys
/// and values, the draft model's included), but no more than `max_concurrent_requests` full-length
/// requests need.
const DEFAULT_KV_BUDGET_BYTES: usize = 4 << 30;

/// How to serve, besides where (the listener): what `vicuna serve`'s flags set (see its `--help`).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The name the API reports for the model.
    pub model_id: String,
    pub max_concurrent_requests: usize,
    pub max_batch_size: Option<usize>,
    pub max_input_tokens: Option<usize>,
    /// Longest prompt in bytes, refused before tokenizing (`None`: `max_input_tokens` times the
    /// longest token of the vocabulary, see [`longest_token_bytes`]).
    pub max_input_bytes: Option<usize>,
    pub max_total_tokens: usize,
    pub max_batch_total_tokens: Option<usize>,
    pub max_batch_prefill_tokens: usize,
    pub max_stop_sequences: usize,
    pub api_key: Option<String>,
    pub payload_limit: usize,
    /// After SIGTERM, how long running requests may go on before they are cancelled.
    pub shutdown_grace: Duration,
    /// Keep computed KV blocks and reuse them for requests that start the same way.
    pub prefix_cache: bool,
    /// Most KV blocks the prefix cache keeps (`None`: what the budget has left).
    pub prefix_cache_blocks: Option<usize>,
    /// How long a connection may take to send a request's head (request line and headers); then
    /// it is closed. Also how long an idle kept-alive connection stays open.
    pub header_read_timeout: Duration,
    /// Origins browsers may call from (`*`: any); empty: no CORS headers.
    pub cors_allow_origins: Vec<String>,
    /// LoRA adapters served from the start, as (name, PEFT folder).
    pub loras: Vec<(String, std::path::PathBuf)>,
    /// Most distinct adapters in the running batch (vLLM's `--max-loras`).
    pub max_loras: usize,
    /// Speculative decoding of every sequence (`None`: one token a step).
    pub speculation: Option<Speculation>,
}

/// How the server speculates: each decoding sequence guesses up to `limits.max` tokens a step, by
/// prompt lookup or with a draft model of the same vocabulary (each sequence keeping its own cache
/// of it), and the batch's pass checks every sequence's guesses at once.
#[derive(Clone)]
pub struct Speculation {
    /// `None`: prompt lookup.
    pub draft_model: Option<Arc<QuantLlama>>,
    pub limits: DraftLimits,
}

impl std::fmt::Debug for Speculation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speculation").field("guesser", &self.guesser()).field("limits", &self.limits).finish()
    }
}

impl Speculation {
    /// `"draft_model"` or `"lookup"`, as /info says.
    pub fn guesser(&self) -> &'static str {
        if self.draft_model.is_some() {
            "draft_model"
        } else {
            "lookup"
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "vicuna".into(),
            max_concurrent_requests: 128,
            max_batch_size: None,
            max_input_tokens: None,
            max_input_bytes: None,
            max_total_tokens: 2048,
            max_batch_total_tokens: None,
            max_batch_prefill_tokens: 512,
            max_stop_sequences: 4,
            api_key: None,
            payload_limit: 2_000_000,
            shutdown_grace: Duration::from_secs(30),
            prefix_cache: true,
            prefix_cache_blocks: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            cors_allow_origins: Vec::new(),
            loras: Vec::new(),
            max_loras: DEFAULT_MAX_LORAS,
            speculation: None,
        }
    }
}

/// `--max-loras`' default: distinct adapters in one batch. Each costs only its own small products per step, so
/// the bound is there to cap a step's adapter work, not memory.
pub const DEFAULT_MAX_LORAS: usize = 16;

/// `--header-read-timeout`'s default. A request head is a few hundred bytes to a few KB, which a
/// real client sends in one write: 10 s is ample even on a bad mobile link, and frees a slowloris
/// connection (one that drips its head byte by byte) 3x sooner than hyper's 30 s default or 6x
/// sooner than nginx's `client_header_timeout` of 60 s. hyper also applies it to the wait for the
/// next request on a kept-alive connection, so idle connections close after 10 s too; HTTP
/// clients' pools expect that (httpx drops idle connections after 5 s, and browsers and urllib3
/// reconnect when a pooled connection was closed).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes of text one token of `tokenizer` stands for (27 for LLaMA's vocabulary:
/// `▁административ`). A prompt of `n` tokens then has at most `n` times this many bytes, so
/// `--max-input-bytes`'s default of `--max-input-tokens` times this never refuses a prompt that
/// would fit in tokens, while still bounding what is tokenized (55 KB for LLaMA at 2047 tokens,
/// against the 2 MB a body may hold). A fixed ratio would not do: real text averages ~4 bytes a
/// token, but a run of long pieces (Cyrillic words, runs of spaces in code) reaches 10-27.
/// Byte-fallback tokens (`<0x41>`) stand for one byte.
pub fn longest_token_bytes(tokenizer: &Tokenizer) -> usize {
    (0..tokenizer.vocab_size() as u32)
        .filter_map(|id| tokenizer.id_to_piece(id))
        .map(|piece| {
            let is_byte = piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>');
            if is_byte {
                1
            } else {
                // SentencePiece's word-start mark stands for one space.
                piece.replace('\u{2581}', " ").len()
            }
        })
        .max()
        .unwrap_or(1)
        .max(1)
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The limits that follow from the options and the model, checked together.
struct Plan {
    limits: Limits,
    scheduler: SchedulerConfig,
    kv_tokens: usize,
}

fn plan(model: &QuantLlama, tokenizer: &Tokenizer, options: &ServerOptions) -> Result<Plan, Error> {
    let context = model.config().max_position_embeddings;
    let max_total = options.max_total_tokens;
    if max_total < 2 || max_total > context {
        return Err(format!(
            "--max-total-tokens {max_total} must be between 2 and the model's context of {context} tokens"
        )
        .into());
    }
    let max_input = options.max_input_tokens.unwrap_or(max_total - 1);
    if max_input == 0 || max_input >= max_total {
        return Err(format!(
            "--max-input-tokens {max_input} must be at least 1 and below --max-total-tokens {max_total}"
        )
        .into());
    }
    let max_input_bytes =
        options.max_input_bytes.unwrap_or_else(|| max_input.saturating_mul(longest_token_bytes(tokenizer)));
    if max_input_bytes == 0 {
        return Err("--max-input-bytes must be at least 1".into());
    }
    if options.header_read_timeout.is_zero() {
        return Err("--header-read-timeout must be at least 1 second".into());
    }
    for origin in &options.cors_allow_origins {
        if origin.is_empty() || axum::http::HeaderValue::from_str(origin).is_err() {
            return Err(
                format!("--cors-allow-origin {origin:?} is not an origin (`https://host[:port]` or `*`)").into()
            );
        }
    }
    let c = model.config();
    // With a draft model each sequence also keeps the draft's cache, as long as its own: the budget pays for both.
    let draft_kv_bytes =
        options.speculation.as_ref().and_then(|s| s.draft_model.as_ref()).map_or(0, |d| d.kv_bytes_per_token());
    let kv_bytes_per_token = model.kv_bytes_per_token() + draft_kv_bytes;
    let kv_tokens = options.max_batch_total_tokens.unwrap_or_else(|| {
        (DEFAULT_KV_BUDGET_BYTES / kv_bytes_per_token.max(1))
            .min(options.max_concurrent_requests.saturating_mul(max_total))
            .max(max_total)
    });
    if kv_tokens < max_total {
        return Err(format!(
            "--max-batch-total-tokens {kv_tokens} must be at least --max-total-tokens {max_total}: \
             otherwise a full-length request could never run"
        )
        .into());
    }
    for (flag, value) in [
        ("--max-concurrent-requests", options.max_concurrent_requests),
        ("--max-batch-size", options.max_batch_size.unwrap_or(1)),
        ("--max-batch-prefill-tokens", options.max_batch_prefill_tokens),
        ("--prefix-cache-blocks (use --no-prefix-cache to turn it off)", options.prefix_cache_blocks.unwrap_or(1)),
        ("--max-loras", options.max_loras),
    ] {
        if value == 0 {
            return Err(format!("{flag} must be at least 1").into());
        }
    }
    let draft_limits = options.speculation.as_ref().map(|s| s.limits.check()).transpose()?;
    if let (Some(speculation), Some(limits)) = (&options.speculation, draft_limits) {
        if let Some(draft) = &speculation.draft_model {
            DraftSource::Model(draft)
                .drafter(model, SamplingParams::default(), 0, limits)
                .map_err(|e| format!("--draft-model: {e}"))?;
        }
    }
    vicuna_engine::check_tokenizer_fits(tokenizer, c.vocab_size, &options.model_id)?;
    Ok(Plan {
        limits: Limits {
            max_input_bytes,
            max_input_tokens: max_input,
            max_total_tokens: max_total,
            max_stop_sequences: options.max_stop_sequences,
            max_choices: options.max_batch_size.map_or(MAX_CHOICES, |b| b.min(MAX_CHOICES)),
            kv_blocks: kv_tokens.div_ceil(BLOCK_TOKENS),
        },
        scheduler: SchedulerConfig {
            max_batch_size: options.max_batch_size.unwrap_or(usize::MAX),
            // Rounded up: a request of --max-total-tokens must always fit an empty batch.
            kv_blocks: kv_tokens.div_ceil(BLOCK_TOKENS),
            max_prefill_tokens: options.max_batch_prefill_tokens,
            prefix_cache: options.prefix_cache,
            prefix_cache_blocks: options.prefix_cache_blocks,
            max_loras: options.max_loras,
            speculation: draft_limits,
        },
        kv_tokens,
    })
}

/// Bind `host:port` (0 picks a free port). Done before the model loads, so that a port in use
/// is reported at once rather than after minutes of loading.
pub fn bind(host: &str, port: u16) -> Result<std::net::TcpListener, Error> {
    std::net::TcpListener::bind((host, port)).map_err(|e| format!("cannot listen on {host}:{port}: {e}").into())
}

/// Serve on `listener` until `shutdown` completes (for `vicuna serve`: [`shutdown_signal`]).
/// Prints `listening on http://ADDRESS` on stdout once ready. After `shutdown` it drains:
/// `/health` answers 503 and new generation requests get 503 (with `Connection: close`), while
/// the requests in flight finish within `shutdown_grace` (then they are cancelled); once none is
/// left the port closes, open connections end, and it returns.
pub fn serve_on(
    listener: std::net::TcpListener,
    model: QuantLlama,
    tokenizer: Tokenizer,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let plan = plan(&model, &tokenizer, &options)?;
    // The adapters given at start: any that cannot be served stops the server before it listens.
    let adapters = Adapters::new(model.config().clone(), &options.model_id);
    for (name, dir) in &options.loras {
        adapters.load(name, dir, unix_time()).map_err(|e| format!("--lora {name}: {e}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let address: SocketAddr = listener.local_addr()?;

    let metrics = Arc::new(Metrics::new(&options.model_id, options.max_loras));
    let tokenizer = Arc::new(tokenizer);
    let info = serde_json::json!({
        "model_id": options.model_id,
        "model_sha": null,
        "model_dtype": "float32",
        "model_device_type": "cpu",
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": options.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": plan.limits.max_stop_sequences,
        "max_input_bytes": plan.limits.max_input_bytes,
        "max_input_tokens": plan.limits.max_input_tokens,
        "max_input_length": plan.limits.max_input_tokens,
        "max_total_tokens": plan.limits.max_total_tokens,
        "max_batch_total_tokens": plan.kv_tokens,
        "max_batch_prefill_tokens": options.max_batch_prefill_tokens,
        "max_batch_size": options.max_batch_size,
        "max_client_batch_size": 1,
        "kv_cache_block_tokens": BLOCK_TOKENS,
        "kv_cache_blocks": plan.scheduler.kv_blocks,
        "kv_cache_bytes": plan.scheduler.kv_blocks * model.block_shape().bytes(),
        "kv_cache_dtype": format!("{:?}", model.block_shape().kv_type).to_lowercase(),
        "prefix_cache": options.prefix_cache,
        "prefix_cache_blocks": options.prefix_cache_blocks,
        "max_loras": options.max_loras,
        "speculation": options.speculation.as_ref().map(|s| serde_json::json!({
            "guesser": s.guesser(),
            "draft_max": s.limits.max,
            "draft_min": s.limits.min,
            "draft_p_min": s.limits.p_min,
        })),
        "router": "vicuna",
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
    });
    let limits = plan.limits.clone();
    let draft = options.speculation.as_ref().and_then(|s| s.draft_model.clone());
    let (scheduler, scheduler_thread) =
        Scheduler::spawn(model, draft, tokenizer.clone(), plan.scheduler, metrics.clone())?;
    let state = Arc::new(AppState {
        tokenizer,
        scheduler,
        limits,
        permits: Arc::new(Semaphore::new(options.max_concurrent_requests)),
        metrics,
        info,
        model_id: options.model_id.clone(),
        api_key: options.api_key.clone(),
        payload_limit: options.payload_limit,
        draining: Default::default(),
        started: unix_time(),
        cors: Cors::new(&options.cors_allow_origins),
        adapters,
    });
    let app = http::router(state.clone());

    println!("listening on http://{address}");
    use std::io::Write;
    std::io::stdout().flush()?;
    tracing::info!("serving {} on http://{address}", options.model_id);

    runtime.block_on(async {
        let draining_started = Arc::new(Notify::new());
        // The drain: from the signal on, /health answers 503 and new generation requests get 503
        // (so a load balancer's health check takes this replica out, and one that retries sends
        // them elsewhere), while the port stays open and the requests in flight run to their end.
        // Once none is left (or the grace period cancelled them), the listener closes.
        let drained = {
            let state = state.clone();
            let draining_started = draining_started.clone();
            let max_in_flight = options.max_concurrent_requests;
            async move {
                shutdown.await;
                eprintln!("shutting down: finishing running requests (up to {:?})", options.shutdown_grace);
                state.draining.store(true, Ordering::SeqCst);
                draining_started.notify_one();
                // A request holds its permit from queueing to its last event.
                while state.permits.available_permits() < max_in_flight {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let server = serve_http1(listener, app, options.header_read_timeout, drained);
        // After the signal, the running requests get `shutdown_grace` to finish.
        let deadline = async {
            draining_started.notified().await;
            tokio::time::sleep(options.shutdown_grace).await;
            eprintln!("shutting down: cancelling the requests still running");
            state.scheduler.cancel_all("the server is shutting down");
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = server => {}
            _ = deadline => unreachable!("the deadline never completes"),
        }
    });
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(1));
    // With every handle gone, the scheduler finishes what it holds and stops.
    let _ = scheduler_thread.join();
    Ok(())
}

/// Serve `app` on `listener` until `signal` completes; then accept no more connections, let each
/// open one finish its requests (hyper's graceful shutdown: idle ones close at once) and return
/// when all are closed. This is what `axum::serve(..).with_graceful_shutdown(..)` does, written
/// out on hyper's HTTP/1 connection builder because axum's does not expose the header read
/// timeout (and without a timer hyper applies none: a connection that never finishes its
/// request head would be held forever).
async fn serve_http1(
    mut listener: tokio::net::TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    signal: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    // Set once the signal came; every connection task watches it.
    let (stopping, _) = tokio::sync::watch::channel(false);
    // Each connection task holds a receiver: all are dropped once every connection is closed.
    let (open_connections, connection_guard) = tokio::sync::watch::channel(());
    let mut signal = std::pin::pin!(signal);
    loop {
        let (stream, _) = tokio::select! {
            // axum's accept: retries at once on a connection's own error (reset, aborted), after
            // a second on the listener's (out of file descriptors).
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut signal => break,
        };
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop = stopping.subscribe();
        let guard = connection_guard.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection closed: {e}");
                    }
                }
                () = async { drop(stop.wait_for(|&stopping| stopping).await) } => {
                    connection.as_mut().graceful_shutdown();
                    if let Err(e) = connection.await {
                        tracing::debug!("connection closed: {e}");
                    }
                }
            }
            drop(guard);
        });
    }
    // No new connections from here on: the port is closed.
    drop(listener);
    stopping.send_replace(true);
    drop(connection_guard);
    open_connections.closed().await;
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
