//! The HTTP front: shared state, the router, the API-key guard, request bodies, and the glue from a
//! validated request to the scheduler and back (plain JSON or server-sent events).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Semaphore;
use vicuna_tokenizer::Tokenizer;

use crate::adapters::{self, Adapters};
use crate::error::ApiError;
use crate::metrics::{Metrics, Rejection};
use crate::scheduler::{Event, Job, Scheduler};
use crate::validation::{input_too_long, validate, DefaultLength, GenerateParameters, Limits, ValidRequest};
use crate::{openai, tgi};

/// The chat page, built into the binary.
const CHAT_PAGE: &str = include_str!("chat.html");

pub struct AppState {
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: Scheduler,
    pub limits: Limits,
    /// One permit per request in flight (queued or running): `max_concurrent_requests`.
    pub permits: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// The body of `GET /info`.
    pub info: serde_json::Value,
    pub model_id: String,
    pub api_key: Option<String>,
    pub payload_limit: usize,
    /// Set on SIGTERM: new generation requests get 503 while the running ones finish.
    pub draining: AtomicBool,
    /// Unix time the server started (OpenAI's `created` for the model).
    pub started: u64,
    /// The origins browsers may call from (`--cors-allow-origin`); empty: no CORS headers at all.
    pub cors: Cors,
    /// The LoRA adapters served beside the base model.
    pub adapters: Adapters,
}

/// Which other origins a browser page may call the API from (`--cors-allow-origin`).
#[derive(Clone, Debug, Default)]
pub struct Cors {
    /// Every origin (`*`).
    pub any: bool,
    /// These origins exactly (`https://app.example.com`, scheme and port included, as browsers send them).
    pub origins: Vec<String>,
}

impl Cors {
    /// From the flag's values: `*` among them allows every origin.
    pub fn new(origins: &[String]) -> Cors {
        let any = origins.iter().any(|o| o == "*");
        let origins = origins.iter().filter(|o| *o != "*").map(|o| o.trim_end_matches('/').to_string()).collect();
        Cors { any, origins }
    }

    fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let origin = origin?;
        let text = origin.to_str().ok()?;
        self.origins.iter().any(|o| o == text).then(|| origin.clone())
    }
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/", get(chat_page).post(tgi::compat))
        .route("/generate", post(tgi::generate))
        .route("/generate_stream", post(tgi::generate_stream))
        .route("/tokenize", post(tgi::tokenize))
        .route("/info", get(tgi::info))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        // Outside the key guard: preflights carry no key, and refusals need CORS headers too (or
        // the page cannot read why it was refused).
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .layer(middleware::from_fn_with_state(state.clone(), close_when_draining))
        .with_state(state)
}

/// What a CORS preflight is told: the methods and request headers the API uses, for an hour.
const CORS_ALLOW_METHODS: &str = "GET, POST, OPTIONS";
const CORS_ALLOW_HEADERS: &str = "Authorization, Content-Type";
const CORS_MAX_AGE_SECONDS: &str = "3600";

/// With `--cors-allow-origin`: a preflight (`OPTIONS` with `Access-Control-Request-Method`) is
/// answered here with 204 and the `Access-Control-Allow-*` headers, without the API key (browsers
/// never send credentials on a preflight); every other response from an allowed origin gets
/// `Access-Control-Allow-Origin`. An origin that is not allowed gets no CORS headers, so the browser
/// refuses the call. Without the flag this does nothing.
async fn cors(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let cors = &state.cors;
    if !cors.enabled() {
        return next.run(request).await;
    }
    let allow = cors.allow(request.headers().get(header::ORIGIN));
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if allow.is_some() {
            let headers = response.headers_mut();
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(CORS_ALLOW_METHODS));
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(CORS_ALLOW_HEADERS));
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(CORS_MAX_AGE_SECONDS));
        }
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    if let Some(allow) = allow {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    }
    if !cors.any {
        // The answer depends on the Origin header: caches must keep one per origin.
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// With `--api-key`, everything but `/health` and the page itself needs `Authorization: Bearer KEY`.
/// The page is static HTML with no data in it; every call it makes carries the key. `HEAD` is
/// answered as `GET`, so it is open where `GET` is.
async fn require_api_key(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let path = request.uri().path();
        let read = request.method() == Method::GET || request.method() == Method::HEAD;
        let open = path == "/health" || (path == "/" && read);
        if !open && !bearer_matches(request.headers(), key) {
            state.metrics.rejected(Rejection::Unauthorized);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")) else {
        return false;
    };
    // Compare in time independent of where the first difference is.
    token.len() == key.len() && token.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

/// 200 while the server takes requests; 503 once the model thread has stopped, and while it
/// drains after SIGTERM (so health checks and readiness probes take it out of rotation while
/// its running requests finish).
async fn health(State(state): State<SharedState>) -> Response {
    if !state.scheduler.is_alive() {
        ApiError::unavailable("the model thread has stopped").into_response()
    } else if state.draining.load(Ordering::SeqCst) {
        ApiError::unavailable("the server is shutting down: finishing its running requests").into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

/// While draining, every response asks the client to close its connection, so that kept-alive
/// connections (a load balancer's pool) move to another replica rather than queue here.
async fn close_when_draining(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if state.draining.load(Ordering::SeqCst) {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn metrics(State(state): State<SharedState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// The body as JSON of type `T`: at most `payload_limit` bytes (413), UTF-8 and the right shape (422).
pub async fn read_json<T: DeserializeOwned>(state: &AppState, body: Body) -> Result<T, ApiError> {
    let result = read_json_inner(state.payload_limit, body).await;
    if result.is_err() {
        state.metrics.rejected(Rejection::Validation);
    }
    result
}

async fn read_json_inner<T: DeserializeOwned>(limit: usize, body: Body) -> Result<T, ApiError> {
    let mut bytes = Vec::new();
    let mut too_large = false;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            // Read on (up to a bound) before answering, so the client gets the answer rather
            // than a connection reset for the bytes it is still sending.
            too_large = true;
            if bytes.len() + chunk.len() > 4 * limit {
                break;
            }
        }
        bytes.extend_from_slice(&chunk);
    }
    if too_large {
        return Err(ApiError::payload_too_large(limit));
    }
    parse_json(&bytes)
}

/// A whole request body as JSON of type `T` (422 when it is not UTF-8, not JSON, or not that shape).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::validation(format!("the request body is not valid UTF-8 (bad byte at offset {})", e.valid_up_to()))
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::validation(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::validation(format!("invalid request: {inner}"))
        } else {
            ApiError::validation(format!("invalid request: `{path}`: {inner}"))
        }
    })?;
    deserializer.end().map_err(|e| ApiError::validation(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// [`validate`] with the server's tokenizer and limits; failures are 422s (and counted).
///
/// Tokenizing is CPU work that grows with the prompt, so it runs on tokio's blocking pool: a long
/// prompt must not hold one of the two async worker threads that answer every other request
/// (`/health` included). The prompt's bytes are checked first (`--max-input-bytes`), so a huge
/// one is refused without being tokenized at all.
pub async fn validate_request(
    state: &AppState,
    inputs: &str,
    parameters: &GenerateParameters,
    default_length: DefaultLength,
    internal_stops: &[&str],
    stream: bool,
) -> Result<ValidRequest, ApiError> {
    let result = if inputs.len() > state.limits.max_input_bytes {
        // Refused before anything is copied to the blocking pool.
        Err(input_too_long(inputs.len(), state.limits.max_input_bytes))
    } else {
        let limits = state.limits.clone();
        let tokenizer = state.tokenizer.clone();
        let inputs = inputs.to_owned();
        let parameters = parameters.clone();
        let stops: Vec<String> = internal_stops.iter().map(|s| s.to_string()).collect();
        blocking(move || {
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            validate(&limits, &tokenizer, &inputs, &parameters, default_length, &stops, stream)
        })
        .await?
    };
    let mut valid = result.map_err(|message| {
        state.metrics.rejected(Rejection::Validation);
        ApiError::validation(message)
    })?;
    valid.lora = state.adapters.resolve(parameters.adapter_id.as_deref()).map_err(|message| {
        state.metrics.rejected(Rejection::Validation);
        ApiError::unknown_model(message)
    })?;
    Ok(valid)
}

/// Run `work` (CPU work that grows with the request, such as tokenizing) on tokio's blocking
/// pool, off the async worker threads.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::generation(format!("the request's work on the blocking pool failed: {e}")))
}

/// Queue a validated request; its events arrive on the returned receiver. Dropping the receiver
/// cancels the request.
pub fn submit(state: &AppState, request: &ValidRequest) -> Result<UnboundedReceiver<Event>, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        state.metrics.rejected(Rejection::Unavailable);
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        state.metrics.rejected(Rejection::Overloaded);
        ApiError::overloaded()
    })?;
    let (events, receiver) = unbounded_channel();
    let job = Job {
        prompt: request.prompt.clone(),
        config: request.config.clone(),
        prompt_logprobs: request.prompt_logprobs,
        choices: request.best_of,
        lora: request.lora.clone(),
        events,
        permit,
        arrived: Instant::now(),
    };
    state.scheduler.submit(job).map_err(|_| {
        state.metrics.rejected(Rejection::Unavailable);
        ApiError::unavailable("the model thread has stopped")
    })?;
    Ok(receiver)
}

/// A stream of server-sent events: `convert` turns each scheduler event into the `data:` payloads
/// to send, and says when the stream is complete. A scheduler that stops without an end sends
/// one error payload.
pub fn sse_response<F>(receiver: UnboundedReceiver<Event>, convert: F) -> Response
where
    F: FnMut(Event) -> (Vec<String>, bool) + Send + 'static,
{
    struct State<F> {
        receiver: Option<UnboundedReceiver<Event>>,
        queued: VecDeque<String>,
        convert: F,
    }
    let state = State { receiver: Some(receiver), queued: VecDeque::new(), convert };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.queued.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            let receiver = s.receiver.as_mut()?;
            match receiver.recv().await {
                Some(event) => {
                    let (payloads, done) = (s.convert)(event);
                    s.queued.extend(payloads);
                    if done {
                        s.receiver = None;
                    }
                }
                None => {
                    s.receiver = None;
                    s.queued.push_back(ApiError::generation("the generation stopped unexpectedly").body().to_string());
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

/// One generated sequence of a request, once it ended.
pub struct Choice {
    pub tokens: Vec<crate::scheduler::GeneratedToken>,
    pub end: crate::scheduler::End,
}

impl Choice {
    /// Log-probability of the whole sequence: how `best_of` ranks choices (as TGI and vLLM).
    pub fn logprob(&self) -> f64 {
        self.tokens.iter().map(|t| t.logprob as f64).sum()
    }
}

/// Wait for every choice of a request to end; returns them in choice order.
pub async fn collect(mut receiver: UnboundedReceiver<Event>, choices: usize) -> Result<Vec<Choice>, ApiError> {
    let mut tokens: Vec<Vec<_>> = (0..choices).map(|_| Vec::new()).collect();
    let mut ends: Vec<Option<crate::scheduler::End>> = (0..choices).map(|_| None).collect();
    let mut remaining = choices;
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Token { choice, token, end } => {
                tokens[choice].push(token);
                if let Some(end) = end {
                    ends[choice] = Some(*end);
                    remaining -= 1;
                    if remaining == 0 {
                        return Ok(tokens
                            .into_iter()
                            .zip(ends)
                            .map(|(tokens, end)| Choice { tokens, end: end.expect("every choice ended") })
                            .collect());
                    }
                }
            }
            Event::Stopped(stop) => return Err(stop.into()),
        }
    }
    Err(ApiError::generation("the generation stopped unexpectedly"))
}

/// The `n` best of `choices` by total log-probability (all of them, in order, when there are `n`).
pub fn best(mut choices: Vec<Choice>, n: usize) -> Vec<Choice> {
    if choices.len() > n {
        choices.sort_by(|a, b| b.logprob().total_cmp(&a.logprob()));
        choices.truncate(n);
    }
    choices
}

/// Unix time in seconds.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
