//! Structured output through both APIs: whatever the (random-weight) model prefers, a reply under a JSON
//! schema parses and validates against it (checked with the independent `jsonschema` validator), a
//! `json_object` reply is a JSON object, a TGI regex grammar's reply matches the regex (the `regex`
//! crate), streamed or not, with n > 1; grammars that cannot compile are 422s that say why.

mod common;

use common::{post_json, EventStream, TestServer};
use serde_json::{json, Value};

fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["cat", "dog", "llama"]},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["age"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "tags", "owner"],
        "additionalProperties": false
    })
}

fn assert_valid(text: &str, validator: &jsonschema::Validator, what: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {text:?} is not JSON: {e}"));
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what}: {text:?} breaks the schema: {errors:?}");
}

fn pet_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "pet", "schema": pet_schema(), "strict": true}})
}

/// Chat replies under `response_format` on 20 seeds, sampled at temperature 1: each parses and
/// validates. Returns the replies.
fn twenty_seeds_validate(server: &TestServer, what: &str) -> Vec<String> {
    let validator = jsonschema::validator_for(&pet_schema()).unwrap();
    (0..20)
        .map(|seed| {
            let body = json!({
                "messages": [{"role": "user", "content": "Describe a pet as JSON."}],
                "max_tokens": 400, "seed": seed, "temperature": 1.0, "response_format": pet_format(),
            });
            let response = post_json(server.addr, "/v1/chat/completions", &body).json();
            let choice = &response["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "{what}, seed {seed}: the grammar ends the reply: {response}");
            let text = choice["message"]["content"].as_str().unwrap().to_string();
            assert_valid(&text, &validator, &format!("{what}, seed {seed}"));
            text
        })
        .collect()
}

#[test]
fn a_json_schema_reply_always_validates() {
    let server = TestServer::with_defaults();
    let validator = jsonschema::validator_for(&pet_schema()).unwrap();
    let format = pet_format();
    twenty_seeds_validate(&server, "random-weight model");
    // Streamed, and several choices at once: each choice's text validates.
    let body = json!({
        "prompt": "### Human: A pet?\n### Assistant:", "max_tokens": 400, "seed": 3, "n": 3,
        "response_format": format, "stream": true,
    });
    let mut stream = EventStream::open(server.addr, "/v1/completions", &body);
    let mut texts = vec![String::new(); 3];
    while let Some(chunk) = stream.next_json() {
        for c in chunk["choices"].as_array().unwrap() {
            texts[c["index"].as_u64().unwrap() as usize].push_str(c["text"].as_str().unwrap_or(""));
        }
    }
    for (i, text) in texts.iter().enumerate() {
        assert_valid(text, &validator, &format!("streamed choice {i}"));
    }
    // Greedy as well (the most likely allowed token each time).
    let body = json!({"prompt": "Pet:", "max_tokens": 400, "temperature": 0, "json_schema": pet_schema()});
    let text = post_json(server.addr, "/v1/completions", &body).json()["choices"][0]["text"].clone();
    assert_valid(text.as_str().unwrap(), &validator, "greedy, llama.cpp's json_schema field");
}

/// The trained demo model has preferences of its own (English definitions), unlike the
/// random-weight fixture; under the schema its replies validate all the same.
#[test]
fn the_demo_model_replies_by_the_schema_too() {
    let dir = common::demo_chat_dir();
    let model = vicuna_model::QuantLlama::load(&dir, 2).expect("load the demo chat model");
    let tokenizer = vicuna_tokenizer::Tokenizer::from_file(&dir.join("tokenizer.model")).expect("its tokenizer");
    let options = vicuna_server::ServerOptions { model_id: "vicuna-demo".into(), ..common::test_options() };
    let server = TestServer::start_with(model, tokenizer, options);
    let replies = twenty_seeds_validate(&server, "demo model");
    eprintln!("the demo model under the pet schema, seed 0: {}", replies[0]);
    // The seeds are honoured: sampled replies differ.
    let distinct: std::collections::HashSet<&String> = replies.iter().collect();
    assert!(distinct.len() > 1, "20 seeds gave one reply: {:?}", replies[0]);
}

#[test]
fn json_object_and_tgi_grammars() {
    let server = TestServer::with_defaults();
    for seed in 0..5 {
        let body = json!({
            "messages": [{"role": "user", "content": "JSON please"}],
            "max_tokens": 300, "seed": seed, "response_format": {"type": "json_object"},
            // `}`, `"}` and `"`: a random model then closes what it opens sooner.
            "logit_bias": {"29913": 6, "9092": 6, "29908": 6},
        });
        let response = post_json(server.addr, "/v1/chat/completions", &body).json();
        let text = response["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        if response["choices"][0]["finish_reason"] == "stop" {
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(value.is_object(), "{text}");
        } else {
            assert!(text.trim_start().starts_with('{'), "cut by max_tokens, but an object so far: {text:?}");
        }
    }
    let regex = regex::Regex::new("^[0-9]{3}-[a-z]{2}$").unwrap();
    for seed in 0..5 {
        let parameters = json!({
            "max_new_tokens": 20, "do_sample": true, "seed": seed, "details": true,
            "grammar": {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"},
        });
        let body = post_json(server.addr, "/generate", &json!({"inputs": "Code:", "parameters": parameters})).json();
        let text = body["generated_text"].as_str().unwrap();
        assert!(regex.is_match(text), "seed {seed}: {text:?}");
        assert_eq!(body["details"]["finish_reason"], "eos_token");
    }
    // TGI's json grammar, the schema given as JSON text (as some clients send it).
    let schema = pet_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let parameters = json!({"max_new_tokens": 400, "grammar": {"type": "json", "value": schema.to_string()}});
    let body = post_json(server.addr, "/generate", &json!({"inputs": "Pet:", "parameters": parameters})).json();
    assert_valid(body["generated_text"].as_str().unwrap(), &validator, "TGI json grammar");
    // A Lark grammar (llguidance's format) through llama.cpp's `grammar` field.
    let body = json!({"prompt": "Yes or no?", "max_tokens": 5, "grammar": "start: \"yes\" | \"no\""});
    let text = post_json(server.addr, "/v1/completions", &body).json()["choices"][0]["text"].clone();
    assert!(text == "yes" || text == "no", "{text}");
}

#[test]
fn grammars_that_cannot_run_are_422s() {
    let server = TestServer::with_defaults();
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post_json(server.addr, "/v1/chat/completions", &body)
    };
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}),
            "json_schema",
        ),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}), "schema` is missing"),
        (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
        (json!({"grammar": "root ::= \"a\""}), "GBNF"),
        (json!({"grammar": "start: undefined_rule"}), "lark"),
        (json!({"json_schema": {"type": "object"}, "response_format": {"type": "json_object"}}), "at most one"),
        (json!({"response_format": {"type": "json_object"}, "ignore_eos": true}), "ignore_eos"),
    ];
    for (extra, mentions) in cases {
        let message = chat(extra.clone()).expect_error(422, "validation");
        assert!(message.contains(mentions), "{extra}: {message}");
    }
    let generate = |grammar: Value| {
        let body = json!({"inputs": "Hi", "parameters": {"grammar": grammar}});
        post_json(server.addr, "/generate", &body)
    };
    for (grammar, mentions) in [
        (json!({"type": "regex", "value": "[0-9"}), "regex"),
        (json!({"type": "regex"}), "grammar.value"),
        (json!({"type": "xml", "value": "x"}), "grammar.type"),
        (json!({"type": "json", "value": "{not json"}), "not a JSON schema"),
    ] {
        let message = generate(grammar.clone()).expect_error(422, "validation");
        assert!(message.contains(mentions), "{grammar}: {message}");
    }
}
