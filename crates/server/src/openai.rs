//! OpenAI's routes: `/v1/completions`, `/v1/chat/completions` (plain or streamed, ending in
//! `data: [DONE]`) and `/v1/models`. Their fields are translated to TGI's parameters and validated
//! by the same code; chat messages go through the StableVicuna template.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use vicuna_engine::{random_seed, FinishReason};

use crate::error::ApiError;
use crate::http::{collect, json_response, read_json, sse_response, submit, unix_time, validate_request, SharedState};
use crate::scheduler::{End, Event};
use crate::template::{render_prompt, ChatMessage, ReplyText, Role, STOP_SEQUENCES};
use crate::validation::{DefaultLength, GenerateParameters, ValidRequest};

/// OpenAI's default `max_tokens` for completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The sampling fields both routes share (`top_k`, `repetition_penalty`, `min_tokens` and
/// `ignore_eos` are the usual extensions of OpenAI-compatible servers).
#[derive(Default, Deserialize)]
#[serde(default)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// 0 or less: no top-k filter, as llama.cpp's and vLLM's servers read it.
    top_k: Option<i64>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    n: Option<u32>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    logit_bias: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// At least this many tokens: EOS cannot be chosen before (vLLM's and llama-cpp-python's field).
    min_tokens: Option<u32>,
    /// Go on past EOS until `max_tokens` or a stop sequence (vLLM's field).
    ignore_eos: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct CompletionRequest {
    prompt: Option<OneOrMany>,
    max_tokens: Option<u32>,
    echo: Option<bool>,
    logprobs: Option<Value>,
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ChatRequest {
    messages: Option<Vec<IncomingMessage>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct IncomingMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Sampling {
    /// TGI's parameters for these fields. Temperature 0 means greedy, as in OpenAI's API (top_p
    /// and top_k then have nothing to filter); without a temperature the request samples at 1.0
    /// (OpenAI's default).
    fn parameters(&self, max_new_tokens: Option<u32>) -> Result<GenerateParameters, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("`n` must be 1: this server returns one choice per request".into());
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err("`presence_penalty` is not supported; use `repetition_penalty`".into());
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_null() && b.as_object().is_none_or(|o| !o.is_empty())) {
            return Err("`logit_bias` is not supported".into());
        }
        let (do_sample, temperature) = match self.temperature {
            Some(t) if !(0.0..=2.0).contains(&t) => {
                return Err(format!("`temperature` must be between 0 and 2 (got {t})"));
            }
            Some(0.0) => (false, None),
            t => (true, t),
        };
        if let Some(top_p) = self.top_p {
            // Checked here too: a greedy request drops it below.
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(format!("`top_p` must be in (0, 1] (got {top_p})"));
            }
        }
        Ok(GenerateParameters {
            do_sample: Some(do_sample),
            temperature,
            top_p: self.top_p.filter(|_| do_sample),
            top_k: self.top_k.filter(|&k| do_sample && k > 0),
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            max_new_tokens,
            stop: self.stop.as_ref().map(|s| match s {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(v) => v.clone(),
            }),
            seed: self.seed,
            ..GenerateParameters::default()
        })
    }

    fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// The fields TGI's parameters do not have, applied to the validated request.
    fn extend(&self, valid: &mut ValidRequest) -> Result<(), String> {
        if let Some(min) = self.min_tokens {
            let max = valid.config.max_new_tokens;
            if min as usize > max {
                return Err(format!("`min_tokens` {min} exceeds `max_tokens` {max}"));
            }
            valid.config.min_new_tokens = min as usize;
        }
        valid.config.ignore_eos = self.ignore_eos == Some(true);
        Ok(())
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }
}

/// OpenAI's finish reasons: EOS and stop sequences are both "stop".
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

fn usage(end: &End) -> Value {
    json!({
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.generated_tokens,
        "total_tokens": end.prompt_tokens + end.generated_tokens,
        // OpenAI's field for prompt tokens read from the prefix cache.
        "prompt_tokens_details": {"cached_tokens": end.cached_tokens},
    })
}

fn invalid(state: &SharedState, message: impl Into<String>) -> ApiError {
    state.metrics.rejected(crate::metrics::Rejection::Validation);
    ApiError::validation(message)
}

/// What every response object starts with.
struct Envelope {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

impl Envelope {
    fn new(state: &SharedState, prefix: &str, object: &'static str) -> Self {
        Envelope {
            id: format!("{prefix}-{:016x}", random_seed()),
            object,
            created: unix_time(),
            model: state.model_id.clone(),
        }
    }

    fn with(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("vicuna-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// The chunk `stream_options.include_usage` asks for: no choices, only usage.
    fn usage_chunk(&self, end: &End) -> String {
        let mut chunk = self.with(json!([]));
        chunk["usage"] = usage(end);
        chunk.to_string()
    }
}

const DONE: &str = "[DONE]";

/// The `choices` of a completion (or of one chunk of it).
fn choice(text: &str, finish: Option<&str>) -> Value {
    json!([{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }])
}

pub async fn completions(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: CompletionRequest = read_json(&state, body).await?;
    let mut prompts = request.prompt.map(OneOrMany::into_vec).unwrap_or_default();
    if prompts.len() != 1 {
        return Err(invalid(&state, "`prompt` must be one string (one prompt per request)"));
    }
    let prompt = prompts.remove(0);
    if request.suffix.is_some() {
        return Err(invalid(&state, "`suffix` (insertion) is not supported"));
    }
    if request.logprobs.as_ref().is_some_and(|l| !l.is_null() && l != &json!(0)) {
        return Err(invalid(&state, "`logprobs` is not supported on this route"));
    }
    let mut parameters = request.sampling.parameters(request.max_tokens).map_err(|m| invalid(&state, m))?;
    let echo = request.echo == Some(true);
    parameters.return_full_text = Some(echo);
    let stream = request.sampling.stream();
    let mut valid = validate_request(
        &state,
        &prompt,
        &parameters,
        DefaultLength::Tokens(COMPLETIONS_DEFAULT_MAX_TOKENS),
        &[],
        stream,
    )
    .await?;
    request.sampling.extend(&mut valid).map_err(|m| invalid(&state, m))?;
    let receiver = submit(&state, &valid)?;
    let envelope = Envelope::new(&state, "cmpl", "text_completion");
    if !stream {
        let (_, end) = collect(receiver).await?;
        let text = if echo { format!("{prompt}{}", end.generated_text) } else { end.generated_text.clone() };
        let mut body = envelope.with(choice(&text, Some(finish_reason(end.finish_reason))));
        body["usage"] = usage(&end);
        return Ok(json_response(StatusCode::OK, &body));
    }
    let include_usage = request.sampling.include_usage();
    let mut echo_prompt = echo.then_some(prompt);
    Ok(sse_response(receiver, move |event| match event {
        Event::Token { token, end } => {
            let mut text = echo_prompt.take().unwrap_or_default();
            text.push_str(&token.text);
            let mut payloads = Vec::new();
            if !text.is_empty() {
                payloads.push(envelope.with(choice(&text, None)).to_string());
            }
            let Some(end) = end else { return (payloads, false) };
            payloads.push(envelope.with(choice("", Some(finish_reason(end.finish_reason)))).to_string());
            if include_usage {
                payloads.push(envelope.usage_chunk(&end));
            }
            payloads.push(DONE.into());
            (payloads, true)
        }
        // Cut short (shutdown, a failed model): the error, then `[DONE]` as every OpenAI stream ends.
        Event::Stopped(stop) => (vec![ApiError::from(stop).body().to_string(), DONE.into()], true),
    }))
}

/// The conversation in the template's terms.
fn chat_messages(messages: Vec<IncomingMessage>) -> Result<Vec<ChatMessage>, String> {
    if messages.is_empty() {
        return Err("`messages` must hold at least one message".into());
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(format!("messages[{i}]: role `{other}` is not supported (system, user, assistant)"))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(format!(
                                    "messages[{i}]: content of type `{kind}` is not supported (text only)"
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

pub async fn chat_completions(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: ChatRequest = read_json(&state, body).await?;
    if request.logprobs == Some(true) {
        return Err(invalid(&state, "`logprobs` is not supported on this route"));
    }
    let messages = chat_messages(request.messages.unwrap_or_default()).map_err(|m| invalid(&state, m))?;
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let parameters = request.sampling.parameters(max_tokens).map_err(|m| invalid(&state, m))?;
    let stream = request.sampling.stream();
    let prompt = render_prompt(&messages);
    let mut valid =
        validate_request(&state, &prompt, &parameters, DefaultLength::RestOfContext, &STOP_SEQUENCES, stream).await?;
    request.sampling.extend(&mut valid).map_err(|m| invalid(&state, m))?;
    let receiver = submit(&state, &valid)?;
    if !stream {
        let (_, end) = collect(receiver).await?;
        let envelope = Envelope::new(&state, "chatcmpl", "chat.completion");
        let mut body = envelope.with(json!([{
            "index": 0,
            "message": { "role": "assistant", "content": ReplyText::trim(&end.generated_text), "refusal": null },
            "logprobs": null,
            "finish_reason": finish_reason(end.finish_reason),
        }]));
        body["usage"] = usage(&end);
        return Ok(json_response(StatusCode::OK, &body));
    }
    let envelope = Envelope::new(&state, "chatcmpl", "chat.completion.chunk");
    let include_usage = request.sampling.include_usage();
    let delta = move |envelope: &Envelope, delta: Value, finish: Option<&str>| {
        envelope.with(json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }])).to_string()
    };
    let mut reply = ReplyText::default();
    let mut started = false;
    Ok(sse_response(receiver, move |event| match event {
        Event::Token { token, end } => {
            let mut payloads = Vec::new();
            if !started {
                // OpenAI opens with the role and empty content.
                started = true;
                payloads.push(delta(&envelope, json!({ "role": "assistant", "content": "" }), None));
            }
            let text = reply.push(&token.text);
            if !text.is_empty() {
                payloads.push(delta(&envelope, json!({ "content": text }), None));
            }
            let Some(end) = end else { return (payloads, false) };
            payloads.push(delta(&envelope, json!({}), Some(finish_reason(end.finish_reason))));
            if include_usage {
                payloads.push(envelope.usage_chunk(&end));
            }
            payloads.push(DONE.into());
            (payloads, true)
        }
        // Cut short (shutdown, a failed model): the error, then `[DONE]` as every OpenAI stream ends.
        Event::Stopped(stop) => (vec![ApiError::from(stop).body().to_string(), DONE.into()], true),
    }))
}

pub async fn models(State(state): State<SharedState>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{ "id": state.model_id, "object": "model", "created": state.started, "owned_by": "vicuna" }],
        }),
    )
}
