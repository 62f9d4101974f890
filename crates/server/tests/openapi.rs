//! The OpenAI routes' responses validated against OpenAI's own published OpenAPI schemas
//! (`fixtures/openai/schemas.json`, extracted from github.com/openai/openai-openapi: see the
//! README there): models, completions (plain and every streamed chunk), chat completions (plain
//! and every streamed chunk), from a real server on the tiny fixture model.
//!
//! The schemas are used as published, read with two rules:
//! - OpenAPI's `nullable: true` (a 3.0 keyword the 3.1 document still uses in places) means what it
//!   says in OpenAPI, "or null"; a JSON Schema validator would ignore it, so it is rewritten as
//!   `anyOf: [schema, {type: null}]`.
//! - Allowances for the nulls the real API streams where the spec forbids them, each one narrow
//!   (one field of one kind of response) and named in [`Kind::allowances`].
//!
//! Each check also removes required fields from the real response and expects the validator to
//! refuse it, so that a schema which stopped checking anything would fail here too.

mod common;

use common::{get, post_json, EventStream, TestServer};
use serde_json::{json, Value};

const SCHEMAS: &str = include_str!("fixtures/openai/schemas.json");

#[derive(Clone, Copy, Debug)]
enum Kind {
    Models,
    Completion,
    CompletionChunk,
    Chat,
    ChatChunk,
}

impl Kind {
    /// The component schema this kind of response is.
    fn schema(self) -> &'static str {
        match self {
            Kind::Models => "ListModelsResponse",
            // "Both the streamed and non-streamed response objects share the same shape" (the spec).
            Kind::Completion | Kind::CompletionChunk => "CreateCompletionResponse",
            Kind::Chat => "CreateChatCompletionResponse",
            Kind::ChatChunk => "CreateChatCompletionStreamResponse",
        }
    }

    /// Where the real API sends a null the spec does not allow: (schema, JSON pointer inside it).
    fn allowances(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // OpenAI streams `"finish_reason": null` in every completions chunk but the last, while
            // the spec (one schema for chunks and whole responses) makes it a non-null string.
            Kind::CompletionChunk => {
                &[("CreateCompletionResponse", "/properties/choices/items/properties/finish_reason")]
            }
            _ => &[],
        }
    }

    fn validator(self) -> jsonschema::Validator {
        let mut bundle: Value = serde_json::from_str(SCHEMAS).expect("schemas.json is JSON");
        nullable_as_openapi_means_it(&mut bundle);
        for (schema, pointer) in self.allowances() {
            let field = bundle["components"]["schemas"][schema]
                .pointer_mut(pointer)
                .unwrap_or_else(|| panic!("no {pointer} in {schema}: the spec changed, review the allowance"));
            *field = json!({"anyOf": [field.take(), {"type": "null"}]});
        }
        bundle["$ref"] = json!(format!("#/components/schemas/{}", self.schema()));
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&bundle)
            .unwrap_or_else(|e| panic!("{}: the schema does not compile: {e}", self.schema()))
    }
}

/// `{..., "nullable": true}` → `{"anyOf": [{...}, {"type": "null"}]}`, everywhere.
fn nullable_as_openapi_means_it(node: &mut Value) {
    match node {
        Value::Object(map) => {
            for value in map.values_mut() {
                nullable_as_openapi_means_it(value);
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                let schema = Value::Object(std::mem::take(map));
                map.insert("anyOf".into(), json!([schema, {"type": "null"}]));
            }
        }
        Value::Array(values) => values.iter_mut().for_each(nullable_as_openapi_means_it),
        _ => {}
    }
}

/// The validation errors of `response`, one line each.
fn errors(validator: &jsonschema::Validator, response: &Value) -> Vec<String> {
    validator.iter_errors(response).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// `response` is a valid `kind`, and stops being one when any of `required` (JSON pointers to
/// fields the spec requires) is removed.
fn check(kind: Kind, response: &Value, required: &[&str]) {
    let validator = kind.validator();
    let found = errors(&validator, response);
    assert!(
        found.is_empty(),
        "{kind:?} ({}) does not match OpenAI's schema:\n{}\n{response:#}",
        kind.schema(),
        found.join("\n")
    );
    for pointer in required {
        let (parent, field) = pointer.rsplit_once('/').unwrap();
        let mut broken = response.clone();
        let removed = broken.pointer_mut(parent).and_then(|p| p.as_object_mut()).and_then(|o| o.remove(field));
        assert!(removed.is_some(), "{kind:?}: the response has no {pointer}: {response}");
        assert!(!validator.is_valid(&broken), "{kind:?}: the schema accepts the response without {pointer}");
    }
}

fn server() -> TestServer {
    TestServer::with_defaults()
}

#[test]
fn models_match_list_models_response() {
    let server = server();
    let models = get(server.addr, "/v1/models").json();
    check(Kind::Models, &models, &["/object", "/data", "/data/0/id", "/data/0/created", "/data/0/owned_by"]);
}

#[test]
fn completions_match_create_completion_response() {
    let server = server();
    let body = json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    let response = post_json(server.addr, "/v1/completions", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    check(
        Kind::Completion,
        &response.json(),
        &[
            "/id",
            "/object",
            "/created",
            "/model",
            "/choices",
            "/choices/0/text",
            "/choices/0/logprobs",
            "/usage/total_tokens",
        ],
    );
}

#[test]
fn streamed_completion_chunks_match_create_completion_response() {
    let server = server();
    let body = json!({
        "model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let mut stream = EventStream::open(server.addr, "/v1/completions", &body);
    assert_eq!(stream.status, 200);
    let chunks: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    assert!(chunks.len() >= 3, "text, the finish and the usage: {chunks:?}");
    for chunk in &chunks {
        let required: &[&str] = if chunk["choices"].as_array().unwrap().is_empty() {
            &["/id", "/usage/prompt_tokens"]
        } else {
            &["/id", "/choices/0/index"]
        };
        check(Kind::CompletionChunk, chunk, required);
    }
    // The allowance is only for null: a finish reason outside the enum still fails.
    let mut wrong = chunks[0].clone();
    wrong["choices"][0]["finish_reason"] = json!("tired");
    assert!(!Kind::CompletionChunk.validator().is_valid(&wrong));
}

#[test]
fn chat_completions_match_create_chat_completion_response() {
    let server = server();
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0});
    let response = post_json(server.addr, "/v1/chat/completions", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    check(
        Kind::Chat,
        &response.json(),
        &[
            "/id",
            "/object",
            "/created",
            "/choices/0/finish_reason",
            "/choices/0/logprobs",
            "/choices/0/message/role",
            "/choices/0/message/content",
            // OpenAI sends `"refusal": null`; the spec requires it.
            "/choices/0/message/refusal",
        ],
    );
}

#[test]
fn streamed_chat_chunks_match_create_chat_completion_stream_response() {
    let server = server();
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let mut stream = EventStream::open(server.addr, "/v1/chat/completions", &body);
    assert_eq!(stream.status, 200);
    let chunks: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    assert!(chunks.len() >= 3, "the role, the finish and the usage: {chunks:?}");
    for chunk in &chunks {
        let required: &[&str] = if chunk["choices"].as_array().unwrap().is_empty() {
            &["/id", "/object", "/usage/completion_tokens"]
        } else {
            &["/id", "/object", "/choices/0/delta", "/choices/0/finish_reason", "/choices/0/index"]
        };
        check(Kind::ChatChunk, chunk, required);
    }
}

/// The newer fields in OpenAI's shapes: several choices (`n`) with log-probabilities, plain and streamed, on both
/// routes. (Completions with `echo` are left out: like OpenAI's own API, their first prompt token has a null
/// log-probability, which the spec's `token_logprobs: [number]` does not allow.)
#[test]
fn choices_with_logprobs_match_the_schemas() {
    let server = server();
    let completion =
        json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 6, "n": 2, "seed": 1, "logprobs": 3});
    let response = post_json(server.addr, "/v1/completions", &completion).json();
    assert_eq!(response["choices"].as_array().unwrap().len(), 2);
    check(Kind::Completion, &response, &["/choices/1/text", "/choices/1/index", "/choices/1/logprobs"]);
    let mut stream = EventStream::open(
        server.addr,
        "/v1/completions",
        &json!({"stream": true, "model": "m",
        "prompt": "Once upon a time", "max_tokens": 6, "n": 2, "seed": 1, "logprobs": 3}),
    );
    for chunk in std::iter::from_fn(|| stream.next_json()) {
        check(Kind::CompletionChunk, &chunk, &["/choices/0/index"]);
    }

    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2,
        "seed": 1, "logprobs": true, "top_logprobs": 2});
    let response = post_json(server.addr, "/v1/chat/completions", &chat).json();
    check(
        Kind::Chat,
        &response,
        &[
            "/choices/1/message/content",
            "/choices/1/logprobs/content",
            "/choices/1/logprobs/refusal",
            "/choices/0/logprobs/content/0/token",
            "/choices/0/logprobs/content/0/logprob",
            "/choices/0/logprobs/content/0/bytes",
            "/choices/0/logprobs/content/0/top_logprobs",
        ],
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let mut stream = EventStream::open(server.addr, "/v1/chat/completions", &streamed);
    let chunks: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    let with_logprobs = chunks.iter().filter(|c| c["choices"][0]["logprobs"].is_object()).count();
    assert!(with_logprobs > 0, "{chunks:?}");
    for chunk in &chunks {
        let required: &[&str] = if chunk["choices"][0]["logprobs"].is_object() {
            &["/choices/0/logprobs/content/0/top_logprobs", "/choices/0/logprobs/refusal"]
        } else {
            &["/choices/0/delta"]
        };
        check(Kind::ChatChunk, chunk, required);
    }
}
