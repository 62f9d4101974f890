//! OpenAI's routes: `/v1/completions`, `/v1/chat/completions` (plain or streamed, ending in
//! `data: [DONE]`) and `/v1/models`. Their fields are translated to TGI's parameters and validated
//! by the same code; chat messages go through the StableVicuna template.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use vicuna_engine::{random_seed, FinishReason, GrammarSpec};
use vicuna_tokenizer::Tokenizer;

use crate::error::ApiError;
use crate::http::{
    best, collect, json_response, read_json, sse_response, submit, unix_time, validate_request, Choice, SharedState,
};
use crate::scheduler::{End, Event, GeneratedToken, PromptToken};
use crate::template::{render_prompt, ChatMessage, ReplyText, Role, STOP_SEQUENCES};
use crate::tokens::token_surface;
use crate::validation::{lark_grammar, DefaultLength, GenerateParameters, ValidRequest, MAX_TOP_LOGPROBS};

/// OpenAI's default `max_tokens` for completions.
pub(crate) const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completions prompt in each of OpenAI's forms: a string, token ids, or lists of either.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// The one prompt of a completions request: its text, or its ids (used as given, no BOS added, as
/// vLLM does) with their text.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptInput {
    fn into_one(self) -> Result<Prompt, String> {
        let one = "`prompt` must be one prompt (a string or a list of token ids): one prompt per request";
        match self {
            PromptInput::Text(text) => Ok(Prompt::Text(text)),
            PromptInput::Ids(ids) => Ok(Prompt::Ids(ids)),
            PromptInput::Texts(mut texts) if texts.len() == 1 => Ok(Prompt::Text(texts.remove(0))),
            PromptInput::IdLists(mut lists) if lists.len() == 1 => Ok(Prompt::Ids(lists.remove(0))),
            _ => Err(one.into()),
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
    /// The base model's name or a LoRA adapter's: which one answers.
    model: Option<String>,
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
    /// Structured output: `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}`.
    response_format: Option<Value>,
    /// llama.cpp's fields: a JSON schema, or a grammar (Lark here: llguidance's format).
    json_schema: Option<Value>,
    grammar: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct CompletionRequest {
    prompt: Option<PromptInput>,
    max_tokens: Option<u32>,
    echo: Option<bool>,
    /// Log-probabilities of each token and of this many alternatives (the legacy API's form).
    logprobs: Option<u32>,
    /// Generate this many and return the `n` most likely.
    best_of: Option<u32>,
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Default, Deserialize)]
#[serde(default)]
pub(crate) struct ChatRequest {
    messages: Option<Vec<IncomingMessage>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
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
    /// TGI's parameters for these fields, checked with every other route's by `validate`.
    /// Temperature 0 means greedy, as in OpenAI's API (top_p and top_k then have nothing to
    /// filter); without a temperature the request samples at 1.0 (OpenAI's default).
    fn parameters(&self, max_new_tokens: Option<u32>) -> Result<GenerateParameters, String> {
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
            presence_penalty: self.presence_penalty,
            logit_bias: logit_bias(self.logit_bias.as_ref())?,
            n: self.n,
            max_new_tokens,
            min_new_tokens: self.min_tokens,
            ignore_eos: self.ignore_eos,
            stop: self.stop.as_ref().map(|s| match s {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(v) => v.clone(),
            }),
            seed: self.seed,
            grammar_spec: self.grammar_spec()?,
            adapter_id: self.model.clone(),
            ..GenerateParameters::default()
        })
    }

    /// What `response_format`, `json_schema` or `grammar` constrain the output to (at most one of them).
    fn grammar_spec(&self) -> Result<Option<GrammarSpec>, String> {
        let format = self.response_format.as_ref().filter(|f| !f.is_null());
        let given = [format.is_some(), self.json_schema.is_some(), self.grammar.is_some()];
        if given.iter().filter(|&&g| g).count() > 1 {
            return Err("give at most one of `response_format`, `json_schema` and `grammar`".into());
        }
        if let Some(schema) = &self.json_schema {
            return Ok(Some(GrammarSpec::JsonSchema(schema.clone())));
        }
        if let Some(grammar) = &self.grammar {
            return lark_grammar(grammar).map(Some);
        }
        let Some(format) = format else { return Ok(None) };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(GrammarSpec::JsonObject)),
            Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema) => Ok(Some(GrammarSpec::JsonSchema(schema.clone()))),
                None => Err("`response_format.json_schema.schema` is missing".into()),
            },
            _ => Err("`response_format.type` must be text, json_object or json_schema".into()),
        }
    }

    fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true)
    }
}

/// OpenAI's `logit_bias`: an object from token ids (as strings) to biases.
fn logit_bias(value: Option<&Value>) -> Result<Vec<(u32, f32)>, String> {
    let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let Some(object) = value.as_object() else {
        return Err("`logit_bias` must be an object from token ids to biases, e.g. {\"13\": -100}".into());
    };
    object
        .iter()
        .map(|(key, bias)| {
            let id = key.parse().map_err(|_| format!("`logit_bias`: `{key}` is not a token id"))?;
            let bias = bias.as_f64().ok_or_else(|| format!("`logit_bias`: the bias of token {key} is not a number"))?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// Alternatives per token asked for, within OpenAI's bound.
fn top_count(field: &str, n: u32) -> Result<u32, String> {
    if n > MAX_TOP_LOGPROBS {
        return Err(format!("`{field}` must be at most {MAX_TOP_LOGPROBS} (got {n})"));
    }
    Ok(n)
}

/// OpenAI's finish reasons: EOS and stop sequences are both "stop".
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// Token counts of a request: its prompt once, and every choice's tokens.
fn usage<'e>(mut ends: impl Iterator<Item = &'e End>) -> Value {
    let first = ends.next().expect("at least one choice");
    let completion: usize = first.generated_tokens + ends.map(|e| e.generated_tokens).sum::<usize>();
    json!({
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        // OpenAI's field for prompt tokens read from the prefix cache.
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
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
    /// The envelope of `valid`'s answer: `model` is its adapter's name, or the base model's.
    fn new(state: &SharedState, valid: &ValidRequest, prefix: &str, object: &'static str) -> Self {
        Envelope {
            id: format!("{prefix}-{:016x}", random_seed()),
            object,
            created: unix_time(),
            model: valid.lora.as_ref().map_or_else(|| state.model_id.clone(), |lora| lora.name.clone()),
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
    fn usage_chunk<'e>(&self, ends: impl Iterator<Item = &'e End>) -> String {
        let mut chunk = self.with(json!([]));
        chunk["usage"] = usage(ends);
        chunk.to_string()
    }
}

const DONE: &str = "[DONE]";

/// A stream's progress over a request's choices: it is complete once each has ended.
struct StreamEnds {
    ends: Vec<Option<End>>,
    /// `stream_options.include_usage`: a usage chunk before `[DONE]`.
    include_usage: bool,
}

impl StreamEnds {
    fn new(choices: usize, include_usage: bool) -> Self {
        StreamEnds { ends: (0..choices).map(|_| None).collect(), include_usage }
    }

    /// Records an end. When it was the last, the stream's closing payloads (the usage chunk if asked for, then
    /// `[DONE]`) go after `payloads`; returns whether it was.
    fn record(&mut self, choice: usize, end: End, envelope: &Envelope, payloads: &mut Vec<String>) -> bool {
        self.ends[choice] = Some(end);
        if !self.ends.iter().all(Option::is_some) {
            return false;
        }
        if self.include_usage {
            payloads.push(envelope.usage_chunk(self.ends.iter().flatten()));
        }
        payloads.push(DONE.into());
        true
    }
}

/// A generation cut short ends an OpenAI stream with the error, then `[DONE]` as every stream.
fn stopped(stop: crate::scheduler::Stop) -> (Vec<String>, bool) {
    (vec![ApiError::from(stop).body().to_string(), DONE.into()], true)
}

/// The legacy `logprobs` of a completion: each token (as it reads alone), its log-probability,
/// its `top` most likely alternatives (the chosen token always among them, as OpenAI does) and its
/// offset in the choice's text. Tokens that add no text (EOS) are left out.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    /// Characters of text so far.
    offset: usize,
}

impl CompletionLogprobs {
    fn push_prompt(&mut self, state: &SharedState, token: &PromptToken) {
        let (text, _) = token_surface(&state.tokenizer, token.id);
        self.tokens.push(json!(text));
        self.token_logprobs.push(json!(token.logprob));
        self.top_logprobs.push(Value::Null);
        self.text_offset.push(self.offset);
        self.offset += token.text.chars().count();
    }

    fn push(&mut self, state: &SharedState, token: &GeneratedToken) {
        if token.special {
            return;
        }
        let surface = |id| token_surface(&state.tokenizer, id).0;
        let mut top = serde_json::Map::new();
        for t in &token.top {
            top.entry(surface(t.id)).or_insert(json!(t.logprob));
        }
        top.entry(surface(token.id)).or_insert(json!(token.logprob));
        self.tokens.push(json!(surface(token.id)));
        self.token_logprobs.push(json!(token.logprob));
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(self.offset);
        self.offset += token.text.chars().count();
    }

    /// The object, emptying the lists (a stream sends each chunk's tokens once).
    fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

/// One entry of a chat choice's `logprobs.content`: a token, its log-probability and bytes, and
/// its most likely alternatives. None for tokens that add no text (EOS).
fn chat_logprob(state: &SharedState, token: &GeneratedToken) -> Option<Value> {
    if token.special {
        return None;
    }
    let entry = |id, logprob: f32| {
        let (text, bytes) = token_surface(&state.tokenizer, id);
        json!({ "token": text, "logprob": logprob, "bytes": bytes })
    };
    let mut value = entry(token.id, token.logprob);
    value["top_logprobs"] = token.top.iter().map(|t| entry(t.id, t.logprob)).collect();
    Some(value)
}

fn chat_logprobs(content: Vec<Value>) -> Value {
    json!({ "content": content, "refusal": null })
}

/// A completions request in TGI's terms, ready for [`validate_request`], and how to shape its answer.
pub(crate) struct CompletionPlan {
    pub prompt: String,
    pub parameters: GenerateParameters,
    pub stream: bool,
    echo: bool,
    logprobs: Option<u32>,
    include_usage: bool,
}

/// Translates a completions request (its prompt ids decoded with `tokenizer`, for `echo`); the error is a 422's message.
pub(crate) fn plan_completion(request: CompletionRequest, tokenizer: &Tokenizer) -> Result<CompletionPlan, String> {
    let Some(prompt) = request.prompt else {
        return Err("`prompt` is required".into());
    };
    let prompt = prompt.into_one()?;
    if request.suffix.is_some() {
        return Err("`suffix` (insertion) is not supported".into());
    }
    let stream = request.sampling.stream();
    let echo = request.echo == Some(true);
    let logprobs = request.logprobs.map(|n| top_count("logprobs", n)).transpose()?;
    let mut parameters = request.sampling.parameters(request.max_tokens)?;
    parameters.return_full_text = Some(echo);
    let prompt = match prompt {
        Prompt::Text(text) => text,
        Prompt::Ids(ids) => {
            let text = tokenizer.decode(&ids);
            parameters.prompt_ids = Some(ids);
            text
        }
    };
    parameters.top_n_tokens = logprobs;
    parameters.best_of = request.best_of;
    if echo && logprobs.is_some() {
        if stream {
            return Err("`echo` with `logprobs` is not supported when streaming".into());
        }
        parameters.decoder_input_details = Some(true);
    }
    let include_usage = request.sampling.include_usage();
    Ok(CompletionPlan { prompt, parameters, stream, echo, logprobs, include_usage })
}

pub async fn completions(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: CompletionRequest = read_json(&state, body).await?;
    let CompletionPlan { prompt, parameters, stream, echo, logprobs, include_usage } =
        plan_completion(request, &state.tokenizer).map_err(|m| invalid(&state, m))?;
    let valid = validate_request(
        &state,
        &prompt,
        &parameters,
        DefaultLength::Tokens(COMPLETIONS_DEFAULT_MAX_TOKENS),
        &[],
        stream,
    )
    .await?;
    let receiver = submit(&state, &valid)?;
    let envelope = Envelope::new(&state, &valid, "cmpl", "text_completion");
    if !stream {
        let choices = best(collect(receiver, valid.best_of).await?, valid.n);
        let body_choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, Choice { tokens, end })| {
                let text = if echo { format!("{prompt}{}", end.generated_text) } else { end.generated_text.clone() };
                let logprobs = logprobs.map(|_| {
                    let mut lists = CompletionLogprobs::default();
                    end.prefill.iter().for_each(|t| lists.push_prompt(&state, t));
                    tokens.iter().for_each(|t| lists.push(&state, t));
                    lists.take()
                });
                json!({
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(end.finish_reason),
                })
            })
            .collect();
        let mut body = envelope.with(json!(body_choices));
        body["usage"] = usage(choices.iter().map(|c| &c.end));
        return Ok(json_response(StatusCode::OK, &body));
    }
    let mut echo_prompt: Vec<Option<String>> = (0..valid.n).map(|_| echo.then(|| prompt.clone())).collect();
    let mut lists: Vec<CompletionLogprobs> = (0..valid.n).map(|_| CompletionLogprobs::default()).collect();
    let mut ends = StreamEnds::new(valid.n, include_usage);
    Ok(sse_response(receiver, move |event| match event {
        Event::Token { choice, token, end } => {
            let mut text = echo_prompt[choice].take().unwrap_or_default();
            text.push_str(&token.text);
            let chunk = |text: &str, logprobs: Value, finish: Option<&str>| {
                let choices = json!([{ "index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish }]);
                envelope.with(choices).to_string()
            };
            let mut payloads = Vec::new();
            let token_logprobs = logprobs.map(|_| {
                lists[choice].push(&state, &token);
                lists[choice].take()
            });
            if !text.is_empty() || token_logprobs.is_some() {
                payloads.push(chunk(&text, token_logprobs.unwrap_or(Value::Null), None));
            }
            let Some(end) = end else { return (payloads, false) };
            payloads.push(chunk("", Value::Null, Some(finish_reason(end.finish_reason))));
            let done = ends.record(choice, *end, &envelope, &mut payloads);
            (payloads, done)
        }
        Event::Stopped(stop) => stopped(stop),
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

/// A chat request in TGI's terms (its messages rendered with the template), ready for [`validate_request`].
pub(crate) struct ChatPlan {
    pub prompt: String,
    pub parameters: GenerateParameters,
    pub stream: bool,
    logprobs: bool,
    include_usage: bool,
}

/// Translates a chat request; the error is a 422's message.
pub(crate) fn plan_chat(request: ChatRequest) -> Result<ChatPlan, String> {
    let logprobs = request.logprobs == Some(true);
    let top = request.top_logprobs.map(|n| top_count("top_logprobs", n)).transpose()?;
    if top.is_some() && !logprobs {
        return Err("`top_logprobs` needs `logprobs: true`".into());
    }
    let messages = chat_messages(request.messages.unwrap_or_default())?;
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let mut parameters = request.sampling.parameters(max_tokens)?;
    parameters.top_n_tokens = top;
    let stream = request.sampling.stream();
    let prompt = render_prompt(&messages);
    let include_usage = request.sampling.include_usage();
    Ok(ChatPlan { prompt, parameters, stream, logprobs, include_usage })
}

pub async fn chat_completions(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: ChatRequest = read_json(&state, body).await?;
    let ChatPlan { prompt, parameters, stream, logprobs, include_usage } =
        plan_chat(request).map_err(|m| invalid(&state, m))?;
    let valid =
        validate_request(&state, &prompt, &parameters, DefaultLength::RestOfContext, &STOP_SEQUENCES, stream).await?;
    let receiver = submit(&state, &valid)?;
    if !stream {
        let choices = collect(receiver, valid.best_of).await?;
        let envelope = Envelope::new(&state, &valid, "chatcmpl", "chat.completion");
        let body_choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, Choice { tokens, end })| {
                let logprobs =
                    logprobs.then(|| chat_logprobs(tokens.iter().filter_map(|t| chat_logprob(&state, t)).collect()));
                json!({
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": ReplyText::trim(&end.generated_text),
                        "refusal": null,
                    },
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(end.finish_reason),
                })
            })
            .collect();
        let mut body = envelope.with(json!(body_choices));
        body["usage"] = usage(choices.iter().map(|c| &c.end));
        return Ok(json_response(StatusCode::OK, &body));
    }
    let envelope = Envelope::new(&state, &valid, "chatcmpl", "chat.completion.chunk");
    let delta = move |envelope: &Envelope, choice: usize, delta: Value, logprobs: Value, finish: Option<&str>| {
        let choices = json!([{ "index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish }]);
        envelope.with(choices).to_string()
    };
    let mut replies: Vec<ReplyText> = (0..valid.n).map(|_| ReplyText::default()).collect();
    let mut started = vec![false; valid.n];
    let mut ends = StreamEnds::new(valid.n, include_usage);
    Ok(sse_response(receiver, move |event| match event {
        Event::Token { choice, token, end } => {
            let mut payloads = Vec::new();
            if !std::mem::replace(&mut started[choice], true) {
                // OpenAI opens each choice with the role and empty content.
                let opening = json!({ "role": "assistant", "content": "" });
                payloads.push(delta(&envelope, choice, opening, Value::Null, None));
            }
            let text = replies[choice].push(&token.text);
            let token_logprobs = if logprobs { chat_logprob(&state, &token) } else { None };
            if !text.is_empty() || token_logprobs.is_some() {
                let lists = token_logprobs.map_or(Value::Null, |entry| chat_logprobs(vec![entry]));
                payloads.push(delta(&envelope, choice, json!({ "content": text }), lists, None));
            }
            let Some(end) = end else { return (payloads, false) };
            payloads.push(delta(&envelope, choice, json!({}), Value::Null, Some(finish_reason(end.finish_reason))));
            let done = ends.record(choice, *end, &envelope, &mut payloads);
            (payloads, done)
        }
        Event::Stopped(stop) => stopped(stop),
    }))
}

/// The base model, then every adapter loaded.
pub async fn models(State(state): State<SharedState>) -> Response {
    let base = json!({ "id": state.model_id, "object": "model", "created": state.started, "owned_by": "vicuna" });
    let data: Vec<Value> = std::iter::once(base).chain(state.adapters.model_cards()).collect();
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}
