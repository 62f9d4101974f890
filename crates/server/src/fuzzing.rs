//! Entry points for the fuzz targets in `fuzz/` (not part of the supported API): a request body
//! through the route's JSON reading, translation and [`validate`], as the HTTP handlers run them,
//! and payloads through the server's server-sent-events stream.
//!
//! What the handlers do besides is left out: the adapter lookup of `model` / `adapter_id`, which
//! needs a loaded server, and the `--max-input-bytes` check that [`validate`] repeats anyway.

use std::sync::OnceLock;

use axum::response::Response;
use tokio::sync::mpsc::unbounded_channel;
use vicuna_tokenizer::Tokenizer;

use crate::http::{parse_json, sse_response};
use crate::openai::{plan_chat, plan_completion, COMPLETIONS_DEFAULT_MAX_TOKENS};
use crate::scheduler::{Event, Stop};
use crate::template::STOP_SEQUENCES;
use crate::tgi::GenerateRequest;
use crate::validation::{validate, DefaultLength, Limits, ValidRequest, TGI_DEFAULT_MAX_NEW_TOKENS};

/// The routes whose bodies are checked.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// TGI's `POST /` (`/generate` and `/generate_stream` are it with `stream` fixed).
    Tgi,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// A request that passed validation, with what the route asked of it.
#[derive(Debug)]
pub struct Accepted {
    pub valid: ValidRequest,
    pub stream: bool,
    /// The route's own stop sequences (the chat template's), besides the request's.
    pub internal_stops: usize,
}

/// A request body for `route`, read and validated as the server does; the error is the 422's message.
pub fn validate_body(route: Route, body: &[u8], tokenizer: &Tokenizer, limits: &Limits) -> Result<Accepted, String> {
    let message = |e: crate::error::ApiError| e.body().to_string();
    let (inputs, parameters, default_length, stops, stream): (_, _, _, &[&str], _) = match route {
        Route::Tgi => {
            let request: GenerateRequest = parse_json(body).map_err(message)?;
            let stream = request.stream == Some(true);
            (request.inputs, request.parameters.unwrap_or_default(), TGI_DEFAULT_MAX_NEW_TOKENS, &[], stream)
        }
        Route::Completions => {
            let plan = plan_completion(parse_json(body).map_err(message)?, tokenizer)?;
            (plan.prompt, plan.parameters, DefaultLength::Tokens(COMPLETIONS_DEFAULT_MAX_TOKENS), &[], plan.stream)
        }
        Route::Chat => {
            let plan = plan_chat(parse_json(body).map_err(message)?)?;
            (plan.prompt, plan.parameters, DefaultLength::RestOfContext, &STOP_SEQUENCES, plan.stream)
        }
    };
    let valid = validate(limits, tokenizer, &inputs, &parameters, default_length, stops, stream)?;
    Ok(Accepted { valid, stream, internal_stops: stops.len() })
}

/// The bytes of the event stream the server sends for `payloads` (each one event's data), through
/// [`sse_response`] and axum's encoder.
pub fn sse_bytes(payloads: Vec<String>) -> Vec<u8> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime"));
    let (events, receiver) = unbounded_channel();
    events.send(Event::Stopped(Stop::ModelFailed(String::new()))).expect("the receiver is open");
    let mut payloads = Some(payloads);
    let response: Response = sse_response(receiver, move |_| (payloads.take().unwrap_or_default(), true));
    runtime.block_on(axum::body::to_bytes(response.into_body(), usize::MAX)).expect("an SSE body cannot fail").to_vec()
}
