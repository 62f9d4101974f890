//! Text Generation Inference's routes: `POST /` (what the official clients post to), `/generate`,
//! `/generate_stream`, `/tokenize` and `/info`, with TGI's request and response shapes.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::http::{
    best, blocking, collect, json_response, read_json, sse_response, submit, validate_request, Choice, SharedState,
};
use crate::scheduler::{End, Event, GeneratedToken, PromptToken};
use crate::tokens::{is_special, token_surface, token_texts};
use crate::validation::{input_too_long, GenerateParameters, ValidRequest, TGI_DEFAULT_MAX_NEW_TOKENS};

#[derive(Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
    /// Only read by `POST /`, which serves both kinds.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// `POST /`: a stream when `"stream": true`, else a list holding one generate response.
pub async fn compat(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: GenerateRequest = read_json(&state, body).await?;
    if request.stream == Some(true) {
        start_stream(&state, request).await
    } else {
        let response = generate_json(&state, request).await?;
        Ok(json_response(StatusCode::OK, &json!([response])))
    }
}

pub async fn generate(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: GenerateRequest = read_json(&state, body).await?;
    Ok(json_response(StatusCode::OK, &generate_json(&state, request).await?))
}

pub async fn generate_stream(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: GenerateRequest = read_json(&state, body).await?;
    start_stream(&state, request).await
}

async fn validate_tgi(state: &SharedState, request: &GenerateRequest, stream: bool) -> Result<ValidRequest, ApiError> {
    let parameters = request.parameters.clone().unwrap_or_default();
    validate_request(state, &request.inputs, &parameters, TGI_DEFAULT_MAX_NEW_TOKENS, &[], stream).await
}

async fn generate_json(state: &SharedState, request: GenerateRequest) -> Result<Value, ApiError> {
    let valid = validate_tgi(state, &request, false).await?;
    let choices = collect(submit(state, &valid)?, valid.best_of).await?;
    // The most likely of `best_of` is the answer; the others are listed in the details.
    let mut ranked = best(choices, valid.best_of).into_iter();
    let answer = ranked.next().expect("at least one choice");
    let mut response = json!({ "generated_text": full_text(&request.inputs, &valid, &answer.end) });
    if valid.details {
        let mut details = sequence_details(state, &valid, &answer);
        if valid.best_of > 1 {
            let others: Vec<Value> = ranked
                .map(|choice| {
                    let mut sequence = sequence_details(state, &valid, &choice);
                    sequence["generated_text"] = json!(full_text(&request.inputs, &valid, &choice.end));
                    sequence
                })
                .collect();
            details["best_of_sequences"] = json!(others);
        }
        response["details"] = details;
    }
    Ok(response)
}

/// TGI's `details` of one sequence.
fn sequence_details(state: &SharedState, valid: &ValidRequest, choice: &Choice) -> Value {
    let end = &choice.end;
    let mut details = json!({
        "finish_reason": end.finish_reason.as_str(),
        "generated_tokens": end.generated_tokens,
        "seed": end.seed,
        "prefill": end.prefill.iter().map(prompt_token_json).collect::<Vec<_>>(),
        "tokens": choice.tokens.iter().map(token_json).collect::<Vec<_>>(),
    });
    add_speculation(&mut details, end);
    if valid.config.top_logprobs > 0 {
        details["top_tokens"] = json!(choice.tokens.iter().map(|t| top_tokens_json(state, t)).collect::<Vec<_>>());
    }
    details
}

/// One event per token; the last also carries `generated_text` and, if asked, `details`.
async fn start_stream(state: &SharedState, request: GenerateRequest) -> Result<Response, ApiError> {
    let valid = validate_tgi(state, &request, true).await?;
    let receiver = submit(state, &valid)?;
    let mut index = 0;
    let state = state.clone();
    Ok(sse_response(receiver, move |event| match event {
        Event::Token { token, end, .. } => {
            index += 1;
            let top_tokens = (valid.config.top_logprobs > 0).then(|| top_tokens_json(&state, &token));
            let mut data = json!({
                "index": index,
                "token": token_json(&token),
                "top_tokens": top_tokens,
                "generated_text": null,
                "details": null,
            });
            let done = end.is_some();
            if let Some(end) = end {
                data["generated_text"] = json!(full_text(&request.inputs, &valid, &end));
                if valid.details {
                    data["details"] = json!({
                        "finish_reason": end.finish_reason.as_str(),
                        "generated_tokens": end.generated_tokens,
                        "seed": end.seed,
                        "input_length": end.prompt_tokens,
                    });
                    add_speculation(&mut data["details"], &end);
                }
            }
            (vec![data.to_string()], done)
        }
        Event::Stopped(stop) => (vec![ApiError::from(stop).body().to_string()], true),
    }))
}

/// A speculating server's `details` also say how many guessed tokens were checked and kept.
fn add_speculation(details: &mut Value, end: &End) {
    if let Some(s) = end.speculation {
        details["drafted_tokens"] = json!(s.drafted);
        details["accepted_tokens"] = json!(s.accepted);
    }
}

fn full_text(inputs: &str, valid: &ValidRequest, end: &End) -> String {
    if valid.return_full_text {
        format!("{inputs}{}", end.generated_text)
    } else {
        end.generated_text.clone()
    }
}

fn token_json(token: &GeneratedToken) -> Value {
    json!({ "id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special })
}

/// TGI's `top_tokens` of one step: the most likely tokens, each shown alone.
fn top_tokens_json(state: &SharedState, token: &GeneratedToken) -> Value {
    let tokenizer = &state.tokenizer;
    token
        .top
        .iter()
        .map(|t| {
            let (text, _) = token_surface(tokenizer, t.id);
            json!({ "id": t.id, "text": text, "logprob": t.logprob, "special": is_special(tokenizer, t.id) })
        })
        .collect()
}

fn prompt_token_json(token: &PromptToken) -> Value {
    json!({ "id": token.id, "text": token.text, "logprob": token.logprob })
}

/// `POST /tokenize`: the ids of `inputs` (with BOS, as generation sees them), each with its text and
/// its character offsets in the text; special tokens have no offsets. Inputs over `--max-input-bytes`
/// are refused before tokenizing, and the tokenizing runs on the blocking pool (as for generation).
pub async fn tokenize(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: GenerateRequest = read_json(&state, body).await?;
    let limit = state.limits.max_input_bytes;
    if request.inputs.len() > limit {
        state.metrics.rejected(crate::metrics::Rejection::Validation);
        return Err(ApiError::validation(input_too_long(request.inputs.len(), limit)));
    }
    let tokenizer = state.tokenizer.clone();
    let tokens = blocking(move || tokenize_json(&tokenizer, &request.inputs)).await?;
    Ok(json_response(StatusCode::OK, &tokens))
}

fn tokenize_json(tokenizer: &vicuna_tokenizer::Tokenizer, inputs: &str) -> Value {
    let ids = tokenizer.encode(inputs, true);
    let mut offset = 0;
    let tokens: Vec<Value> = ids
        .iter()
        .zip(token_texts(tokenizer, &ids))
        .map(|(&id, text)| {
            if is_special(tokenizer, id) {
                let piece = tokenizer.id_to_piece(id).unwrap_or_default();
                return json!({ "id": id, "text": piece, "special": true, "start": null, "stop": null });
            }
            let start = offset;
            offset += text.chars().count();
            json!({ "id": id, "text": text, "special": false, "start": start, "stop": offset })
        })
        .collect();
    Value::Array(tokens)
}

/// TGI's `/info`, plus the LoRA adapters loaded now (`lora_adapters`: name, folder, rank, target modules).
pub async fn info(State(state): State<SharedState>) -> Response {
    let mut info = state.info.clone();
    info["lora_adapters"] = state
        .adapters
        .model_cards()
        .into_iter()
        .map(|card| {
            serde_json::json!({
                "name": card["id"],
                "path": card["root"],
                "rank": card["lora_rank"],
                "target_modules": card["lora_target_modules"],
            })
        })
        .collect();
    json_response(StatusCode::OK, &info).into_response()
}
