//! `vicuna serve`: a Text Generation Inference- and OpenAI-compatible HTTP server over one model,
//! with continuous batching, plus the StableVicuna chat template shared with `vicuna chat`.
//!
//! The pieces follow TGI's router: [`validation`] turns a request into token ids and a
//! `GenerationConfig`; the [`scheduler`] thread queues, batches and runs them; [`tgi`] and
//! [`openai`] shape the answers; [`http`] holds the routes, the API-key guard and the glue.

mod error;
mod http;
mod metrics;
mod openai;
pub mod scheduler;
pub mod template;
mod tgi;
mod tokens;
pub mod validation;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use vicuna_model::{QuantLlama, BLOCK_TOKENS};
use vicuna_tokenizer::Tokenizer;

use crate::http::{unix_time, AppState};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::validation::{Limits, MAX_CHOICES};

/// Default KV budget when `--max-batch-total-tokens` is not given: this much cache memory (keys
/// and values), but no more than `max_concurrent_requests` full-length requests need.
const DEFAULT_KV_BUDGET_BYTES: usize = 4 << 30;

/// How to serve, besides where (the listener): what `vicuna serve`'s flags set (see its `--help`).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The name the API reports for the model.
    pub model_id: String,
    pub max_concurrent_requests: usize,
    pub max_batch_size: Option<usize>,
    pub max_input_tokens: Option<usize>,
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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "vicuna".into(),
            max_concurrent_requests: 128,
            max_batch_size: None,
            max_input_tokens: None,
            max_total_tokens: 2048,
            max_batch_total_tokens: None,
            max_batch_prefill_tokens: 512,
            max_stop_sequences: 4,
            api_key: None,
            payload_limit: 2_000_000,
            shutdown_grace: Duration::from_secs(30),
            prefix_cache: true,
            prefix_cache_blocks: None,
        }
    }
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
    let c = model.config();
    let kv_bytes_per_token = model.kv_bytes_per_token();
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
    ] {
        if value == 0 {
            return Err(format!("{flag} must be at least 1").into());
        }
    }
    if tokenizer.vocab_size() > c.vocab_size {
        return Err(format!(
            "the tokenizer has {} tokens but the model only {}: they do not belong together",
            tokenizer.vocab_size(),
            c.vocab_size
        )
        .into());
    }
    Ok(Plan {
        limits: Limits {
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
/// Prints `listening on http://ADDRESS` on stdout once ready. After `shutdown`: no new
/// connections or requests; running ones finish within `shutdown_grace` (then they are
/// cancelled); then it returns.
pub fn serve_on(
    listener: std::net::TcpListener,
    model: QuantLlama,
    tokenizer: Tokenizer,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let plan = plan(&model, &tokenizer, &options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let address: SocketAddr = listener.local_addr()?;

    let metrics = Arc::new(Metrics::default());
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
        "router": "vicuna",
        "version": env!("CARGO_PKG_VERSION"),
        "sha": null,
        "docker_label": null,
    });
    let limits = plan.limits.clone();
    let (scheduler, scheduler_thread) = Scheduler::spawn(model, tokenizer.clone(), plan.scheduler, metrics.clone())?;
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
    });
    let app = http::router(state.clone());

    println!("listening on http://{address}");
    use std::io::Write;
    std::io::stdout().flush()?;
    tracing::info!("serving {} on http://{address}", options.model_id);

    let result = runtime.block_on(async {
        let draining_started = Arc::new(Notify::new());
        let signalled = {
            let state = state.clone();
            let draining_started = draining_started.clone();
            async move {
                shutdown.await;
                eprintln!("shutting down: finishing running requests (up to {:?})", options.shutdown_grace);
                state.draining.store(true, Ordering::SeqCst);
                draining_started.notify_one();
            }
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(signalled);
        // After the signal, the running requests get `shutdown_grace` to finish.
        let deadline = async {
            draining_started.notified().await;
            tokio::time::sleep(options.shutdown_grace).await;
            eprintln!("shutting down: cancelling the requests still running");
            state.scheduler.cancel_all("the server is shutting down");
            std::future::pending::<()>().await
        };
        tokio::select! {
            result = server => result,
            _ = deadline => unreachable!("the deadline never completes"),
        }
    });
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(1));
    // With every handle gone, the scheduler finishes what it holds and stops.
    let _ = scheduler_thread.join();
    result?;
    Ok(())
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
