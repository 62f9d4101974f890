//! The HTTP API end to end: a real server on 127.0.0.1 with the tiny fixture model and the real
//! LLaMA tokenizer, spoken to over TCP by a hand-written HTTP/1.1 client. Generated text is checked
//! against the engine's own single-sequence `generate` with the same settings.

mod common;

use std::time::{Duration, Instant};

use common::{get, greedy, post_json, reference, request, test_options, EventStream, TestServer};
use serde_json::{json, Value};
use vicuna_engine::{score, GenerationConfig, SamplingParams};
use vicuna_server::template::{render_prompt, ChatMessage, ReplyText, Role};

const PROMPT: &str = "### Human: What is a llama?\n### Assistant:";

fn token_texts(tokens: &Value) -> String {
    tokens.as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap()).collect()
}

#[test]
fn generate_returns_the_engines_greedy_text_with_details() {
    let server = TestServer::with_defaults();
    let (want_ids, want_text) = reference(PROMPT, &greedy(12));
    let response = post_json(
        server.addr,
        "/generate",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": true}}),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    assert_eq!(body["generated_text"], want_text);
    let details = &body["details"];
    let ids: Vec<u64> = details["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, want_ids.iter().map(|&i| i as u64).collect::<Vec<_>>());
    assert_eq!(details["generated_tokens"], want_ids.len());
    assert_eq!(token_texts(&details["tokens"]), want_text, "token texts add up to the text");
    assert_eq!(details["seed"], Value::Null, "greedy requests have no seed");
    assert_eq!(details["prefill"], json!([]));
    let reason = if want_ids.len() < 12 { "eos_token" } else { "length" };
    assert_eq!(details["finish_reason"], reason);
    for token in details["tokens"].as_array().unwrap() {
        let logprob = token["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0 && logprob.is_finite(), "{token}");
        assert_eq!(token["special"], json!(token["id"] == 2));
    }
    // Without `details`, there are none.
    let body =
        post_json(server.addr, "/generate", &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 12}})).json();
    assert_eq!(body, json!({"generated_text": want_text}));
}

#[test]
fn compat_route_answers_a_list_or_a_stream() {
    let server = TestServer::with_defaults();
    let (_, want_text) = reference(PROMPT, &greedy(8));
    let body = post_json(server.addr, "/", &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 8}})).json();
    assert_eq!(body, json!([{"generated_text": want_text}]));
    let mut stream = EventStream::open(
        server.addr,
        "/",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 8}, "stream": true}),
    );
    assert_eq!(stream.status, 200);
    let events: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    assert_eq!(events.last().unwrap()["generated_text"], want_text);
}

#[test]
fn generate_stream_sends_one_event_per_token_in_tgi_shape() {
    let server = TestServer::with_defaults();
    let (want_ids, want_text) = reference(PROMPT, &greedy(16));
    let mut stream = EventStream::open(
        server.addr,
        "/generate_stream",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "details": true}}),
    );
    assert_eq!(stream.status, 200);
    assert!(stream.header("content-type").unwrap().starts_with("text/event-stream"));
    let events: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    // Framing: every event is exactly one `data: {json}` line and a blank line.
    let raw = String::from_utf8(stream.raw.clone()).unwrap();
    assert!(raw.ends_with("\n\n"));
    for block in raw.trim_end_matches("\n\n").split("\n\n") {
        assert!(block.starts_with("data: {") && block.ends_with('}') && !block.contains('\n'), "{block:?}");
    }
    assert_eq!(events.len(), want_ids.len());
    for (i, (event, &id)) in events.iter().zip(&want_ids).enumerate() {
        assert_eq!(event["index"], i + 1);
        assert_eq!(event["token"]["id"], id);
        assert!(event["token"]["logprob"].is_number());
        assert!(event["token"]["special"].is_boolean());
        if i + 1 < events.len() {
            assert_eq!(event["generated_text"], Value::Null);
            assert_eq!(event["details"], Value::Null);
        }
    }
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"], want_text);
    let streamed: String = events.iter().map(|e| e["token"]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, want_text);
    assert_eq!(last["details"]["generated_tokens"], want_ids.len());
    assert_eq!(last["details"]["input_length"], common::load_tokenizer().encode(PROMPT, true).len());
    assert!(last["details"]["finish_reason"].is_string());
}

#[test]
fn sampling_parameters_seed_stop_and_full_text_follow_tgi() {
    let server = TestServer::with_defaults();
    // Any warper turns sampling on; the seed makes it repeatable and comes back in the details.
    let config = GenerationConfig {
        sampling: SamplingParams { do_sample: true, temperature: 0.8, top_k: 40, top_p: 0.9, ..Default::default() },
        max_new_tokens: 20,
        seed: 1234,
        ..Default::default()
    };
    let (want_ids, want_text) = reference(PROMPT, &config);
    let parameters =
        json!({"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 1234, "max_new_tokens": 20, "details": true});
    let body = post_json(server.addr, "/generate", &json!({"inputs": PROMPT, "parameters": parameters})).json();
    assert_eq!(body["generated_text"], want_text);
    assert_eq!(body["details"]["seed"], 1234);
    assert_eq!(body["details"]["tokens"].as_array().unwrap().len(), want_ids.len());

    // A stop sequence taken from the middle of the greedy text ends the generation there.
    let (_, greedy_text) = reference(PROMPT, &greedy(24));
    let stop: String = greedy_text.chars().skip(greedy_text.chars().count() / 2).take(3).collect();
    let cut = greedy_text.find(&stop).unwrap();
    let body = post_json(
        server.addr,
        "/generate",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "stop": [stop], "details": true}}),
    )
    .json();
    assert_eq!(body["generated_text"], &greedy_text[..cut]);
    assert_eq!(body["details"]["finish_reason"], "stop_sequence");

    let body = post_json(
        server.addr,
        "/generate",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "return_full_text": true}}),
    )
    .json();
    assert_eq!(body["generated_text"], format!("{PROMPT}{greedy_text}"));
}

#[test]
fn decoder_input_details_and_truncate() {
    let server = TestServer::with_defaults();
    let tokenizer = common::load_tokenizer();
    let ids = tokenizer.encode(PROMPT, true);
    let body = post_json(
        server.addr,
        "/generate",
        &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": true, "decoder_input_details": true}}),
    )
    .json();
    let prefill = body["details"]["prefill"].as_array().unwrap();
    let scored = score(&common::load_model(), &ids).unwrap();
    assert_eq!(prefill.len(), ids.len());
    for ((token, &id), logprob) in prefill.iter().zip(&ids).zip(&scored.logprobs) {
        assert_eq!(token["id"], id);
        match logprob {
            None => assert_eq!(token["logprob"], Value::Null),
            Some(l) => assert!((token["logprob"].as_f64().unwrap() - l).abs() < 1e-4, "{token} vs {l}"),
        }
    }
    assert_eq!(token_texts(&body["details"]["prefill"]), PROMPT);

    // `truncate` keeps the last tokens of the input.
    let body = post_json(
        server.addr,
        "/generate",
        &json!({"inputs": PROMPT, "parameters": {
            "max_new_tokens": 2, "truncate": 5, "details": true, "decoder_input_details": true,
        }}),
    )
    .json();
    let kept: Vec<u64> =
        body["details"]["prefill"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(kept, ids[ids.len() - 5..].iter().map(|&i| i as u64).collect::<Vec<_>>());
}

#[test]
fn tokenize_gives_ids_texts_and_offsets() {
    let server = TestServer::with_defaults();
    let text = "Hello world, llamas é!";
    let tokens = post_json(server.addr, "/tokenize", &json!({"inputs": text})).json();
    let tokens = tokens.as_array().unwrap();
    let want = common::load_tokenizer().encode(text, true);
    assert_eq!(tokens.iter().map(|t| t["id"].as_u64().unwrap() as u32).collect::<Vec<_>>(), want);
    assert_eq!(tokens[0], json!({"id": 1, "text": "<s>", "special": true, "start": null, "stop": null}));
    let chars: Vec<char> = text.chars().collect();
    let mut end = 0;
    for token in &tokens[1..] {
        let (start, stop) = (token["start"].as_u64().unwrap() as usize, token["stop"].as_u64().unwrap() as usize);
        assert_eq!(start, end);
        assert_eq!(token["text"], chars[start..stop].iter().collect::<String>());
        end = stop;
    }
    assert_eq!(end, chars.len());
}

#[test]
fn info_health_models_metrics_and_page() {
    let server = TestServer::with_defaults();
    assert_eq!(get(server.addr, "/health").status, 200);
    let info = get(server.addr, "/info").json();
    assert_eq!(info["model_id"], "tiny-v32001");
    assert_eq!(info["max_total_tokens"], 2048);
    assert_eq!(info["max_input_tokens"], 2047);
    assert_eq!(info["max_concurrent_requests"], 128);
    let models = get(server.addr, "/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-v32001");
    assert_eq!(models["data"][0]["object"], "model");

    post_json(server.addr, "/generate", &json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}));
    let metrics = get(server.addr, "/metrics");
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain"));
    let text = metrics.text();
    for name in [
        "vicuna_requests_total 1",
        "vicuna_queue_size 0",
        "vicuna_batch_size 0",
        "vicuna_kv_cache_blocks_in_use 0",
        "vicuna_time_to_first_token_seconds_count 1",
        "vicuna_inter_token_latency_seconds_count",
        "vicuna_generated_tokens_total",
        "vicuna_requests_finished_total{reason=\"length\"}",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    let generated = server.metric("vicuna_generated_tokens_total");
    assert!((1.0..=3.0).contains(&generated));
    assert_eq!(server.metric("vicuna_inter_token_latency_seconds_count"), generated - 1.0);

    let page = get(server.addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("/v1/chat/completions") && html.contains("AbortController"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "no CDN: everything is inline");
    assert!(!html.contains("innerHTML"), "model text never goes through innerHTML");

    let missing = get(server.addr, "/nope");
    missing.expect_error(404, "not_found");
    request(server.addr, "DELETE", "/generate", &[], b"").expect_error(405, "method_not_allowed");
}

#[test]
fn invalid_requests_get_422_with_a_message() {
    let mut options = test_options();
    options.max_input_tokens = Some(16);
    options.max_total_tokens = 64;
    options.payload_limit = 4096;
    let server = TestServer::start(options);
    let generate =
        |parameters: Value| post_json(server.addr, "/generate", &json!({"inputs": "Hi", "parameters": parameters}));
    let cases = [
        (json!({"max_new_tokens": 0}), "max_new_tokens"),
        (json!({"temperature": 0.0}), "temperature"),
        (json!({"temperature": -1.0}), "temperature"),
        (json!({"top_p": 0.0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": 0}), "top_k"),
        (json!({"typical_p": 2.0}), "typical_p"),
        (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
        (json!({"max_new_tokens": 63}), "max-total-tokens"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"truncate": 17}), "truncate"),
        (json!({"best_of": 2}), "best_of"),
        (json!({"temperature": "hot"}), "parameters.temperature"),
        (json!({"max_new_tokens": -1}), "parameters.max_new_tokens"),
        (json!({"stop": "###"}), "parameters.stop"),
        (json!({"do_sample": 1}), "parameters.do_sample"),
    ];
    for (parameters, mentions) in cases {
        let message = generate(parameters.clone()).expect_error(422, "validation");
        assert!(message.contains(mentions), "{parameters}: {message}");
    }
    let long = "llama ".repeat(40);
    let message = post_json(server.addr, "/generate", &json!({"inputs": long})).expect_error(422, "validation");
    assert!(message.contains("max-input-tokens"), "{message}");
    let message = post_json(server.addr, "/generate", &json!({"inputs": 5})).expect_error(422, "validation");
    assert!(message.contains("inputs"), "{message}");
    post_json(server.addr, "/generate", &json!({"inputs": ""})).expect_error(422, "validation");
    post_json(server.addr, "/generate", &json!({"parameters": {}})).expect_error(422, "validation");
    post_json(server.addr, "/generate", &json!([1, 2])).expect_error(422, "validation");
    let message = post_json(
        server.addr,
        "/generate_stream",
        &json!({"inputs": "Hi", "parameters": {"decoder_input_details": true}}),
    )
    .expect_error(422, "validation");
    assert!(message.contains("stream"), "{message}");

    let raw = |body: &[u8]| request(server.addr, "POST", "/generate", &[("Content-Type", "application/json")], body);
    let message = raw(b"{\"inputs\": \"caf\xff\"}").expect_error(422, "validation");
    assert!(message.contains("UTF-8"), "{message}");
    raw(b"{\"inputs\": ").expect_error(422, "validation");
    raw(b"{\"inputs\": \"a\"} trailing").expect_error(422, "validation");
    let huge = format!("{{\"inputs\": \"{}\"}}", "a".repeat(10_000));
    let message = raw(huge.as_bytes()).expect_error(413, "validation");
    assert!(message.contains("4096"), "{message}");

    // OpenAI routes validate the same way, plus their own fields.
    let chat = |body: Value| post_json(server.addr, "/v1/chat/completions", &body);
    let hi = json!([{"role": "user", "content": "Hi"}]);
    for (body, mentions) in [
        (json!({"messages": hi, "max_tokens": 0}), "max_new_tokens"),
        (json!({"messages": hi, "temperature": 3.0}), "temperature"),
        (json!({"messages": hi, "top_p": 0}), "top_p"),
        (json!({"messages": hi, "n": 2}), "`n`"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "role"),
        (json!({"messages": "Hi"}), "messages"),
    ] {
        let message = chat(body.clone()).expect_error(422, "validation");
        assert!(message.contains(mentions), "{body}: {message}");
    }
    let message =
        post_json(server.addr, "/v1/completions", &json!({"prompt": ["a", "b"]})).expect_error(422, "validation");
    assert!(message.contains("prompt"), "{message}");
    let rejected = server.metric("vicuna_requests_rejected_total{reason=\"validation\"}");
    assert!(rejected >= 30.0, "{rejected}");
    assert_eq!(server.metric("vicuna_requests_total"), 0.0, "nothing invalid reached the queue");
}

#[test]
fn api_key_is_required_everywhere_but_health_and_the_page() {
    let mut options = test_options();
    options.api_key = Some("sekret".into());
    let server = TestServer::start(options);
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).to_string();
    let post = |headers: &[(&str, &str)]| request(server.addr, "POST", "/generate", headers, body.as_bytes());
    post(&[]).expect_error(401, "unauthorized");
    let wrong = post(&[("Authorization", "Bearer sekreT")]);
    wrong.expect_error(401, "unauthorized");
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));
    post(&[("Authorization", "sekret")]).expect_error(401, "unauthorized");
    assert_eq!(post(&[("Authorization", "Bearer sekret")]).status, 200);
    for path in ["/info", "/metrics", "/v1/models"] {
        get(server.addr, path).expect_error(401, "unauthorized");
        assert_eq!(request(server.addr, "GET", path, &[("Authorization", "Bearer sekret")], b"").status, 200);
    }
    assert_eq!(get(server.addr, "/health").status, 200);
    assert_eq!(get(server.addr, "/").status, 200, "the page is static; its API calls carry the key");
}

#[test]
fn openai_completions_plain_and_streamed() {
    let server = TestServer::with_defaults();
    let (want_ids, want_text) = reference(PROMPT, &greedy(10));
    let body = post_json(
        server.addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}),
    )
    .json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], "tiny-v32001");
    assert_eq!(body["choices"][0]["text"], want_text);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["finish_reason"], if want_ids.len() < 10 { "stop" } else { "length" });
    let prompt_tokens = common::load_tokenizer().encode(PROMPT, true).len();
    assert_eq!(
        body["usage"],
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": want_ids.len(),
            "total_tokens": prompt_tokens + want_ids.len(),
            // The server's first request: nothing was cached.
            "prompt_tokens_details": {"cached_tokens": 0},
        })
    );
    // echo puts the prompt in front; OpenAI's default is 16 tokens.
    let body =
        post_json(server.addr, "/v1/completions", &json!({"prompt": PROMPT, "temperature": 0, "echo": true})).json();
    let (_, text16) = reference(PROMPT, &greedy(16));
    assert_eq!(body["choices"][0]["text"], format!("{PROMPT}{text16}"));

    let mut stream = EventStream::open(
        server.addr,
        "/v1/completions",
        &json!({
            "prompt": PROMPT, "max_tokens": 10, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        }),
    );
    let data = stream.collect_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], want_ids.len());
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, want_text);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length");
    for chunk in &chunks[..chunks.len() - 2] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunk["object"], "text_completion");
    }
}

#[test]
fn openai_completions_take_min_tokens_ignore_eos_and_top_k_zero() {
    // The fields llama.cpp's and vLLM's servers take, so one load test speaks to them all.
    let server = TestServer::with_defaults();
    let completion = |extra: Value| {
        let mut body = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post_json(server.addr, "/v1/completions", &body)
    };
    for (extra, min_new_tokens, ignore_eos) in
        [(json!({"min_tokens": 40}), 40, false), (json!({"ignore_eos": true}), 0, true), (json!({}), 0, false)]
    {
        let mut config = greedy(40);
        config.min_new_tokens = min_new_tokens;
        config.ignore_eos = ignore_eos;
        let (want_ids, want_text) = reference(PROMPT, &config);
        let body = completion(extra.clone()).json();
        assert_eq!(body["choices"][0]["text"], want_text, "{extra}");
        assert_eq!(body["usage"]["completion_tokens"], want_ids.len(), "{extra}");
        if min_new_tokens == 40 || ignore_eos {
            assert_eq!(want_ids.len(), 40, "{extra}");
            assert_eq!(body["choices"][0]["finish_reason"], "length", "{extra}");
        }
    }
    let message = completion(json!({"min_tokens": 41})).expect_error(422, "validation");
    assert!(message.contains("min_tokens"), "{message}");
    // top_k 0 (or -1) means no top-k filter there, as sampling at temperature 1 with top_k 0 shows.
    for top_k in [0, -1] {
        let body = post_json(
            server.addr,
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "top_k": top_k, "seed": 7}),
        );
        assert_eq!(body.status, 200, "{}", body.text());
        let mut config = greedy(8);
        config.sampling = SamplingParams { do_sample: true, top_k: 0, ..Default::default() };
        config.seed = 7;
        assert_eq!(body.json()["choices"][0]["text"], reference(PROMPT, &config).1);
    }
}

#[test]
fn openai_chat_uses_the_stable_vicuna_template() {
    let server = TestServer::with_defaults();
    let messages = [
        ChatMessage::new(Role::System, "You are terse."),
        ChatMessage::new(Role::User, "Hi"),
        ChatMessage::new(Role::Assistant, "Hello."),
        ChatMessage::new(Role::User, "What is a llama?"),
    ];
    let prompt = render_prompt(&messages);
    assert!(prompt.ends_with("### Human: What is a llama?\n### Assistant:"));
    let mut config = greedy(40);
    config.stop = vec!["###".into()];
    let (ids, text) = reference(&prompt, &config);
    let want = ReplyText::trim(&text);
    let wire = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "What is a llama?"}]},
    ]);
    let body = post_json(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": wire, "max_tokens": 40, "temperature": 0}),
    )
    .json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": want, "refusal": null}));
    assert_eq!(body["usage"]["completion_tokens"], ids.len());

    let mut stream = EventStream::open(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": wire, "max_tokens": 40, "temperature": 0, "stream": true}),
    );
    let data = stream.collect_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, want);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert!(last.get("usage").is_none(), "usage only when asked for");
}

/// One seeded sampling request, streamed; returns its text.
fn seeded_text(addr: std::net::SocketAddr, seed: u64) -> String {
    let mut stream = EventStream::open(
        addr,
        "/generate_stream",
        &json!({"inputs": PROMPT, "parameters": {
            "do_sample": true, "temperature": 0.9, "top_k": 20, "seed": seed, "max_new_tokens": 32,
        }}),
    );
    let events: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    events.last().unwrap()["generated_text"].as_str().unwrap().to_string()
}

#[test]
fn a_seeded_request_gives_the_same_text_alone_and_in_a_batch() {
    let mut options = test_options();
    // Small prefill chunks so the long prompts below are read over several steps.
    options.max_batch_prefill_tokens = 32;
    let server = TestServer::start(options);
    let alone = seeded_text(server.addr, 42);
    assert!(!alone.is_empty());
    let addr = server.addr;
    let batch: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                if i == 3 {
                    return Some(seeded_text(addr, 42));
                }
                // Neighbours: other seeds, greedy ones, long prompts being prefilled meanwhile.
                let inputs = format!("{} Tell me about llamas number {i}.", "Llamas live in the Andes. ".repeat(i * 5));
                let parameters = if i % 2 == 0 {
                    json!({"max_new_tokens": 40 + i})
                } else {
                    json!({"do_sample": true, "seed": i, "max_new_tokens": 25})
                };
                let response = post_json(addr, "/generate", &json!({"inputs": inputs, "parameters": parameters}));
                assert_eq!(response.status, 200, "{}", response.text());
                None
            })
        })
        .collect();
    let in_batch: Vec<String> = batch.into_iter().filter_map(|t| t.join().unwrap()).collect();
    assert_eq!(in_batch, vec![alone]);
    assert!(server.metric("vicuna_requests_total") >= 9.0);
}

#[test]
fn clients_that_disconnect_free_their_kv_blocks() {
    let server = TestServer::with_defaults();
    let body = json!({"inputs": PROMPT, "parameters": {"do_sample": true, "seed": 7, "max_new_tokens": 1500}});
    let mut streams: Vec<EventStream> =
        (0..3).map(|_| EventStream::open(server.addr, "/generate_stream", &body)).collect();
    for stream in &mut streams {
        assert_eq!(stream.status, 200);
        for _ in 0..3 {
            assert!(stream.next_json().unwrap()["generated_text"].is_null(), "still generating");
        }
    }
    // Each holds ceil((prompt + 1500) / 16) blocks.
    let prompt = common::load_tokenizer().encode(PROMPT, true).len();
    let per_request = (prompt + 1500).div_ceil(16) as f64;
    assert_eq!(server.metric("vicuna_kv_cache_blocks_in_use"), 3.0 * per_request);
    drop(streams);
    server.wait_for_metric("vicuna_kv_cache_blocks_in_use", 0.0, Duration::from_secs(10));
    server.wait_for_metric("vicuna_requests_finished_total{reason=\"cancelled\"}", 3.0, Duration::from_secs(10));
    server.wait_for_metric("vicuna_batch_size", 0.0, Duration::from_secs(10));

    // A plain (non-streamed) request whose client hangs up is cancelled too.
    let mut socket = std::net::TcpStream::connect(server.addr).unwrap();
    let body = body.to_string();
    use std::io::Write;
    write!(socket, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    server.wait_for_metric("vicuna_batch_size", 1.0, Duration::from_secs(10));
    drop(socket);
    server.wait_for_metric("vicuna_requests_finished_total{reason=\"cancelled\"}", 4.0, Duration::from_secs(10));
    server.wait_for_metric("vicuna_kv_cache_blocks_in_use", 0.0, Duration::from_secs(10));
}

#[test]
fn requests_beyond_the_concurrency_limit_get_429() {
    let mut options = test_options();
    options.max_concurrent_requests = 2;
    let server = TestServer::start(options);
    let body = json!({"inputs": PROMPT, "parameters": {"do_sample": true, "seed": 3, "max_new_tokens": 1500}});
    let mut streams: Vec<EventStream> =
        (0..2).map(|_| EventStream::open(server.addr, "/generate_stream", &body)).collect();
    for stream in &mut streams {
        assert!(stream.next_json().is_some());
    }
    let message = post_json(server.addr, "/generate", &json!({"inputs": "Hi"})).expect_error(429, "overloaded");
    assert!(message.contains("overloaded"), "{message}");
    assert_eq!(server.metric("vicuna_requests_rejected_total{reason=\"overloaded\"}"), 1.0);
    drop(streams);
    server.wait_for_metric("vicuna_batch_size", 0.0, Duration::from_secs(10));
    // The places are given back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response =
            post_json(server.addr, "/generate", &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}));
        if response.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", response.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Time of every event of a stream, and the final text.
fn timed_events(mut stream: EventStream) -> Vec<(Instant, Value)> {
    std::iter::from_fn(|| stream.next_json().map(|e| (Instant::now(), e))).collect()
}

#[test]
fn requests_that_do_not_fit_the_kv_budget_wait_their_turn() {
    let mut options = test_options();
    // 4 blocks of 16 tokens: room for one request of 3 blocks at a time.
    options.max_batch_total_tokens = Some(64);
    options.max_total_tokens = 64;
    let server = TestServer::start(options);
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 40}}); // 2 + 40 tokens → 3 blocks
    let first = EventStream::open(server.addr, "/generate_stream", &body);
    let addr = server.addr;
    // Requests that had ended when the second got its first token, as the server counts them (it counts an end
    // before it admits anyone else, so this does not depend on when the first request's client reads its events).
    let second = std::thread::spawn(move || {
        let mut stream = EventStream::open(addr, "/generate_stream", &body);
        let first_event = stream.next_json();
        let ended: f64 = get(addr, "/metrics")
            .text()
            .lines()
            .filter(|line| line.starts_with("vicuna_requests_finished_total{"))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        (ended, first_event.into_iter().chain(std::iter::from_fn(|| stream.next_json())).collect::<Vec<_>>())
    });
    let first = timed_events(first);
    let (ended_before_second_started, second) = second.join().unwrap();
    assert!(!first.is_empty() && !second.is_empty());
    assert_eq!(ended_before_second_started, 1.0, "the second request ran before the first freed its blocks");
    assert_eq!(first.last().unwrap().1["generated_text"], second.last().unwrap()["generated_text"]);
    server.wait_for_metric("vicuna_kv_cache_blocks_in_use", 0.0, Duration::from_secs(5));
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_other_streams_keep_flowing() {
    let mut options = test_options();
    options.max_batch_prefill_tokens = 16;
    let server = TestServer::start(options);
    let running = EventStream::open(
        server.addr,
        "/generate_stream",
        &json!({"inputs": PROMPT, "parameters": {"do_sample": true, "seed": 11, "max_new_tokens": 1500}}),
    );
    let addr = server.addr;
    let long_prompt = "Llamas are domesticated South American camelids. ".repeat(150); // ~1500 tokens
    let reader = std::thread::spawn(move || {
        let mut running = running;
        let mut times = Vec::new();
        for _ in 0..400 {
            if running.next_json().is_none() {
                break;
            }
            times.push(Instant::now());
        }
        times
    });
    std::thread::sleep(Duration::from_millis(50));
    let sent = Instant::now();
    let long = timed_events(EventStream::open(
        addr,
        "/generate_stream",
        &json!({"inputs": long_prompt, "parameters": {"max_new_tokens": 1}}),
    ));
    let long_first_token = long[0].0;
    let running_times = reader.join().unwrap();
    let during_prefill = running_times.iter().filter(|&&t| t > sent && t < long_first_token).count();
    // The prompt takes ~95 steps of 16 tokens; the running stream gets a token in each.
    assert!(during_prefill >= 30, "only {during_prefill} tokens streamed while the long prompt was read");
}

/// Requests that start like an earlier one read its cached KV blocks instead of computing them, and give what the
/// engine alone gives from scratch (greedy) and what a server without a prefix cache gives (seeded), alone and in a
/// batch of requests sharing the prefix; `--no-prefix-cache` turns it off.
#[test]
fn requests_sharing_a_prefix_read_it_from_the_cache_and_give_the_same_text() {
    let system = "### Human: You are a helpful llama expert who answers briefly. ".repeat(4);
    let prompts: Vec<String> =
        (0..4).map(|i| format!("{system}Question {i}: what do llamas eat?\n### Assistant:")).collect();
    let ids: Vec<Vec<u32>> = {
        let tokenizer = common::load_tokenizer();
        prompts.iter().map(|p| tokenizer.encode(p, true)).collect()
    };
    let shared = ids[0].iter().zip(&ids[1]).take_while(|(a, b)| a == b).count();
    let shared_blocks = shared / 16;
    assert!(shared_blocks >= 3 && shared % 16 != 0, "the prompts share {shared} tokens");
    let seeded =
        |i: usize| json!({"inputs": prompts[i], "parameters": {"do_sample": true, "seed": 5, "max_new_tokens": 12}});
    let text = |addr, body: &Value| {
        let response = post_json(addr, "/generate", body);
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()["generated_text"].as_str().unwrap().to_string()
    };

    let mut options = test_options();
    options.prefix_cache = false;
    let plain = TestServer::start(options);
    let want: Vec<String> = (0..4).map(|i| text(plain.addr, &seeded(i))).collect();
    assert_eq!(plain.metric("vicuna_prefix_cache_lookups_total"), 0.0);
    assert_eq!(plain.metric("vicuna_prefix_cache_blocks"), 0.0);

    let server = TestServer::with_defaults();
    assert_eq!(text(server.addr, &seeded(0)), want[0]);
    assert_eq!(server.metric("vicuna_prefix_cache_hit_tokens_total"), 0.0);
    // Alone: the second request reads the shared blocks from the cache.
    assert_eq!(text(server.addr, &seeded(1)), want[1]);
    // To the token: the shared whole blocks and the shared start of the next one.
    assert_eq!(server.metric("vicuna_prefix_cache_hit_tokens_total"), shared as f64);
    // Greedy, against the engine alone.
    let greedy_body = json!({"inputs": prompts[2], "parameters": {"max_new_tokens": 12}});
    assert_eq!(text(server.addr, &greedy_body), common::reference(&prompts[2], &common::greedy(12)).1);
    // In a batch, all sharing the cached blocks at once.
    let addr = server.addr;
    let batch: Vec<String> = (0..4)
        .map(|i| {
            let body = seeded(i);
            std::thread::spawn(move || text(addr, &body))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(batch, want);
    assert!(server.metric("vicuna_prefix_cache_blocks") >= shared_blocks as f64);
    // Every full block of the last prompt is cached now; OpenAI's usage says how much was read from the cache.
    let hits_before = server.metric("vicuna_prefix_cache_hit_tokens_total");
    let response = post_json(addr, "/v1/completions", &json!({"prompt": prompts[3], "max_tokens": 2}));
    let cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
    assert!((ids[3].len() - 1) / 16 * 16 <= cached && cached < ids[3].len(), "{cached} of {}", ids[3].len());
    assert_eq!(server.metric("vicuna_prefix_cache_hit_tokens_total") - hits_before, cached as f64);
    server.wait_for_metric("vicuna_kv_cache_blocks_in_use", 0.0, Duration::from_secs(5));
}

/// A budget full of cached blocks evicts them for a new request instead of making it wait.
#[test]
fn a_full_prefix_cache_makes_room_instead_of_refusing() {
    let mut options = test_options();
    options.max_batch_total_tokens = Some(128); // 8 blocks
    options.max_total_tokens = 128;
    let server = TestServer::start(options);
    for i in 0..6 {
        // Each leaves ~4 full blocks cached: together far more than the budget.
        let inputs = format!("Request {i}: {}", "llamas and alpacas ".repeat(12));
        let response =
            post_json(server.addr, "/generate", &json!({"inputs": inputs, "parameters": {"max_new_tokens": 8}}));
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(server.metric("vicuna_prefix_cache_blocks") <= 8.0);
    }
    assert!(server.metric("vicuna_prefix_cache_evictions_total") > 0.0);
    assert_eq!(server.metric("vicuna_kv_cache_blocks_in_use"), 0.0);
}
