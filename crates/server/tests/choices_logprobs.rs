//! The API fields clients send beyond one plain choice: log-probabilities (OpenAI's completions and
//! chat, TGI's `top_n_tokens` and prompt details), several choices (`n`, `best_of`), OpenAI's
//! penalties and `logit_bias`. Log-probabilities are checked against the engine's teacher-forced
//! `score` (a separate pass over the whole text), not against the server's own sampler.

mod common;

use common::{load_model, load_tokenizer, post_json, reference, test_options, EventStream, TestServer};
use serde_json::{json, Value};
use vicuna_engine::{score, GenerationConfig, SamplingParams};
use vicuna_server::template::{render_prompt, ChatMessage, Role, STOP_SEQUENCES};

const PROMPT: &str = "### Human: What is a llama?\n### Assistant:";

fn ids_of(details: &Value) -> Vec<u32> {
    details["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap() as u32).collect()
}

/// Greedy ids TGI's route generates for `inputs` (the reference for which tokens a greedy OpenAI
/// request chose).
fn tgi_greedy_ids(server: &TestServer, inputs: &str, max_new_tokens: usize, stop: &[&str]) -> Vec<u32> {
    let parameters = json!({"max_new_tokens": max_new_tokens, "details": true, "stop": stop});
    let body = post_json(server.addr, "/generate", &json!({"inputs": inputs, "parameters": parameters})).json();
    ids_of(&body["details"])
}

/// `log p(generated[i] | prompt, generated[..i])` by scoring the whole text in one pass.
fn teacher_forced(prompt: &str, generated: &[u32]) -> Vec<f64> {
    let mut ids = load_tokenizer().encode(prompt, true);
    let prompt_len = ids.len();
    ids.extend_from_slice(generated);
    let scored = score(&load_model(), &ids).unwrap();
    scored.logprobs[prompt_len..].iter().map(|l| l.unwrap()).collect()
}

#[test]
fn chat_logprobs_are_the_models_log_softmax_and_list_the_argmax_first() {
    let server = TestServer::with_defaults();
    let messages = vec![ChatMessage::new(Role::User, "What is a llama?")];
    let body = json!({
        "messages": [{"role": "user", "content": "What is a llama?"}],
        "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 5,
    });
    let response = post_json(server.addr, "/v1/chat/completions", &body).json();
    let choice = &response["choices"][0];
    assert_eq!(choice["logprobs"]["refusal"], Value::Null);
    let content = choice["logprobs"]["content"].as_array().unwrap();
    let prompt = render_prompt(&messages);
    let ids = tgi_greedy_ids(&server, &prompt, 12, &STOP_SEQUENCES);
    let eos = load_tokenizer().eos_id();
    let texty: Vec<u32> = ids.iter().copied().filter(|&id| id != eos).collect();
    assert_eq!(content.len(), texty.len(), "one entry per token that adds text: {content:?}");
    let want = teacher_forced(&prompt, &ids);
    for (i, entry) in content.iter().enumerate() {
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!((logprob - want[i]).abs() < 1e-4, "token {i}: {logprob} vs scored {}", want[i]);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        // Greedy: the chosen token is the argmax, so it heads its own list, with the same value.
        assert_eq!(top[0]["token"], entry["token"]);
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        let token = entry["token"].as_str().unwrap();
        if !token.starts_with("bytes:") {
            assert_eq!(entry["bytes"], json!(token.as_bytes()), "bytes are the token's UTF-8");
        }
    }

    // Streamed: the same entries, one chunk per token.
    let mut stream = EventStream::open(server.addr, "/v1/chat/completions", &with(&body, json!({"stream": true})));
    let streamed: Vec<Value> = std::iter::from_fn(|| stream.next_json())
        .filter_map(|chunk| chunk["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, content);
}

/// `base` with the fields of `extra` set.
fn with(base: &Value, extra: Value) -> Value {
    let mut object = base.clone();
    for (key, value) in extra.as_object().unwrap() {
        object[key] = value.clone();
    }
    object
}

#[test]
fn completion_logprobs_hold_the_chosen_token_and_its_alternatives() {
    let server = TestServer::with_defaults();
    let body = json!({"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 3});
    let response = post_json(server.addr, "/v1/completions", &body).json();
    let choice = &response["choices"][0];
    let lists = &choice["logprobs"];
    let tokens = lists["tokens"].as_array().unwrap();
    let n = tokens.len();
    for key in ["token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lists[key].as_array().unwrap().len(), n, "{key}");
    }
    let ids = tgi_greedy_ids(&server, PROMPT, 10, &[]);
    let want = teacher_forced(PROMPT, &ids);
    let mut offset = 0;
    for i in 0..n {
        let logprob = lists["token_logprobs"][i].as_f64().unwrap();
        assert!((logprob - want[i]).abs() < 1e-4, "token {i}: {logprob} vs {}", want[i]);
        let top = lists["top_logprobs"][i].as_object().unwrap();
        assert!((3..=4).contains(&top.len()), "the top 3, and the chosen token if not among them");
        let token = tokens[i].as_str().unwrap();
        assert_eq!(top[token].as_f64(), Some(logprob), "the chosen token is in its list");
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(best, logprob, "greedy picks the argmax");
        assert_eq!(lists["text_offset"][i], offset);
        offset += token.chars().count();
    }
    let text = choice["text"].as_str().unwrap();
    if !tokens.iter().any(|t| t.as_str().unwrap().starts_with("bytes:")) {
        let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(joined, text, "the tokens spell the text");
    }

    // Streamed, each chunk carries its own token's lists; together they are the same.
    let mut stream = EventStream::open(server.addr, "/v1/completions", &with(&body, json!({"stream": true})));
    let chunks: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, lists["token_logprobs"].as_array().unwrap());

    // With `echo`, the prompt's tokens come first, scored in the batch like TGI's prefill.
    let echoed = post_json(server.addr, "/v1/completions", &with(&body, json!({"echo": true, "max_tokens": 2}))).json();
    let lists = &echoed["choices"][0]["logprobs"];
    let prompt_ids = load_tokenizer().encode(PROMPT, true);
    let scored = score(&load_model(), &prompt_ids).unwrap();
    assert_eq!(lists["token_logprobs"][0], Value::Null, "the first token has no prefix");
    for (i, want) in scored.logprobs.iter().enumerate().skip(1) {
        let got = lists["token_logprobs"][i].as_f64().unwrap();
        assert!((got - want.unwrap()).abs() < 1e-4, "prompt token {i}: {got} vs {want:?}");
    }
    assert!(echoed["choices"][0]["text"].as_str().unwrap().starts_with(PROMPT));
}

#[test]
fn prompt_logprobs_in_small_chunks_equal_one_scoring_pass() {
    let mut options = test_options();
    options.max_batch_prefill_tokens = 4;
    let server = TestServer::start(options);
    let parameters = json!({"max_new_tokens": 3, "details": true, "decoder_input_details": true});
    let body = post_json(server.addr, "/generate", &json!({"inputs": PROMPT, "parameters": parameters})).json();
    let ids = load_tokenizer().encode(PROMPT, true);
    let scored = score(&load_model(), &ids).unwrap();
    let prefill = body["details"]["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), ids.len());
    for (token, want) in prefill.iter().zip(&scored.logprobs) {
        match want {
            None => assert_eq!(token["logprob"], Value::Null),
            Some(want) => assert!((token["logprob"].as_f64().unwrap() - want).abs() < 1e-4, "{token} vs {want}"),
        }
    }
    // And the generation after it is the plain greedy one.
    assert_eq!(ids_of(&body["details"]), reference(PROMPT, &common::greedy(3)).0);
}

#[test]
fn logit_bias_bans_a_token_and_renormalizes_the_rest() {
    let server = TestServer::with_defaults();
    let first = |bias: Value| {
        let body = json!({"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 2, "logit_bias": bias});
        let response = post_json(server.addr, "/v1/completions", &body).json();
        let lists = response["choices"][0]["logprobs"].clone();
        (lists["tokens"][0].as_str().unwrap().to_string(), lists["top_logprobs"][0].as_object().unwrap().clone())
    };
    let (best, top) = first(Value::Null);
    let mut ranked: Vec<(String, f64)> = top.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(ranked[0].0, best);
    let banned = tgi_greedy_ids(&server, PROMPT, 1, &[])[0];

    // Banned, the runner-up wins, with its probability renormalized over what is left.
    let (chosen, top) = first(json!({ banned.to_string(): -100 }));
    assert_eq!(chosen, ranked[1].0);
    let want = ranked[1].1 - (1.0 - ranked[0].1.exp()).ln();
    let got = top[&chosen].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");

    // Sampled at a high temperature, a banned token never comes; a +100 token always does.
    let tokenizer = load_tokenizer();
    let runner_up = tokenizer.encode(PROMPT, true).len(); // any id but the banned one
    let favourite = if banned as usize == runner_up { runner_up + 1 } else { runner_up };
    let body = json!({
        "prompt": PROMPT, "max_tokens": 8, "temperature": 2, "n": 8, "seed": 1, "logprobs": 0,
        "logit_bias": { banned.to_string(): -100 },
    });
    for choice in post_json(server.addr, "/v1/completions", &body).json()["choices"].as_array().unwrap() {
        let banned_text = tokenizer.token_bytes(banned);
        for token in choice["logprobs"]["tokens"].as_array().unwrap() {
            assert_ne!(token.as_str().unwrap().as_bytes(), banned_text, "a banned token came out");
        }
    }
    let favoured = json!({"prompt": PROMPT, "max_tokens": 4, "temperature": 1, "seed": 5,
        "logit_bias": { favourite.to_string(): 100 }});
    let text = post_json(server.addr, "/v1/completions", &favoured).json()["choices"][0]["text"].clone();
    let piece = String::from_utf8(tokenizer.token_bytes(favourite as u32)).unwrap();
    assert_eq!(text.as_str().unwrap(), piece.repeat(4), "a +100 bias leaves practically no other choice");
}

#[test]
fn n_choices_are_seeded_each_on_its_own_stream() {
    let server = TestServer::with_defaults();
    let body = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 1, "n": 3, "seed": 7});
    let texts = |body: &Value| -> Vec<String> {
        let response = post_json(server.addr, "/v1/completions", body).json();
        let choices = response["choices"].as_array().unwrap();
        assert!(choices.iter().all(|c| c["logprobs"].is_null()), "no logprobs unless asked for");
        choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["text"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let three = texts(&body);
    assert_eq!(three.len(), 3);
    assert_eq!(texts(&body), three, "seeded: the same three again");
    assert!(three[0] != three[1] || three[1] != three[2], "each choice has its own stream: {three:?}");
    // Choice i is what one request seeded `seed + i` gives, so it is what the engine gives alone.
    for (i, text) in three.iter().enumerate() {
        let config = GenerationConfig {
            sampling: SamplingParams { do_sample: true, top_k: 0, ..Default::default() },
            max_new_tokens: 12,
            seed: 7 + i as u64,
            ..Default::default()
        };
        assert_eq!(text, &reference(PROMPT, &config).1, "choice {i}");
    }
    let usage = &post_json(server.addr, "/v1/completions", &body).json()["usage"];
    assert_eq!(usage["prompt_tokens"], load_tokenizer().encode(PROMPT, true).len());

    // A request is one request in the metrics however many choices it has, even when they all end in one step.
    let ended = |s: &TestServer| s.metric("vicuna_requests_finished_total{reason=\"length\"}");
    let before = ended(&server);
    let same_step = json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "n": 4, "ignore_eos": true});
    assert_eq!(post_json(server.addr, "/v1/completions", &same_step).json()["choices"].as_array().unwrap().len(), 4);
    assert_eq!(ended(&server) - before, 1.0);
    server.wait_for_metric("vicuna_batch_size", 0.0, std::time::Duration::from_secs(5));

    // Streamed chat with n = 2: each choice's chunks add up to that choice of the plain response.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "n": 2, "seed": 3});
    let plain = post_json(server.addr, "/v1/chat/completions", &chat).json();
    let mut stream = EventStream::open(server.addr, "/v1/chat/completions", &with(&chat, json!({"stream": true})));
    let mut streamed = [String::new(), String::new()];
    let mut finished = [false, false];
    while let Some(chunk) = stream.next_json() {
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            streamed[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
            finished[i] |= !c["finish_reason"].is_null();
        }
    }
    assert_eq!(finished, [true, true]);
    for (i, text) in streamed.iter().enumerate() {
        // The plain reply is trimmed of surrounding whitespace; the stream trims only the start.
        assert_eq!(text.trim_end(), plain["choices"][i]["message"]["content"].as_str().unwrap(), "choice {i}");
    }
}

#[test]
fn tgi_best_of_answers_the_most_likely_and_lists_the_others_with_top_tokens() {
    let server = TestServer::with_defaults();
    let parameters = json!({
        "max_new_tokens": 6, "best_of": 3, "do_sample": true, "seed": 11, "details": true, "top_n_tokens": 3,
    });
    let body = post_json(server.addr, "/generate", &json!({"inputs": PROMPT, "parameters": parameters})).json();
    let details = &body["details"];
    let total =
        |d: &Value| -> f64 { d["tokens"].as_array().unwrap().iter().map(|t| t["logprob"].as_f64().unwrap()).sum() };
    let others = details["best_of_sequences"].as_array().unwrap();
    assert_eq!(others.len(), 2);
    for other in others {
        assert!(total(details) >= total(other), "the answer is the most likely sequence");
        assert!(other["generated_text"].is_string());
    }
    let seeds: Vec<u64> = std::iter::once(details).chain(others).map(|d| d["seed"].as_u64().unwrap()).collect();
    let mut sorted = seeds.clone();
    sorted.sort();
    assert_eq!(sorted, vec![11, 12, 13], "one seed per sequence: {seeds:?}");
    let tokens = details["tokens"].as_array().unwrap();
    let top = details["top_tokens"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    for (token, top) in tokens.iter().zip(top) {
        let top = top.as_array().unwrap();
        assert_eq!(top.len(), 3);
        let best = top[0]["logprob"].as_f64().unwrap();
        assert!(token["logprob"].as_f64().unwrap() <= best + 1e-6, "{token} vs {top:?}");
        if top.iter().any(|t| t["id"] == token["id"]) {
            let listed = top.iter().find(|t| t["id"] == token["id"]).unwrap();
            assert_eq!(listed["logprob"], token["logprob"]);
        }
    }
    // Streamed tokens carry their alternatives too.
    let stream_parameters = json!({"max_new_tokens": 3, "top_n_tokens": 2});
    let mut stream =
        EventStream::open(server.addr, "/generate_stream", &json!({"inputs": PROMPT, "parameters": stream_parameters}));
    let events: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    assert_eq!(events.len(), 3);
    for event in events {
        let top = event["top_tokens"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["id"], event["token"]["id"], "greedy: the token is the most likely");
    }
}

#[test]
fn openai_penalties_reach_the_sampler() {
    let server = TestServer::with_defaults();
    let messages = vec![ChatMessage::new(Role::User, "Say something")];
    for (field, value) in [("frequency_penalty", 1.5f32), ("presence_penalty", -1.0)] {
        let body =
            json!({"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 24, "temperature": 0});
        let mut request = body.clone();
        request[field] = json!(value);
        let got = post_json(server.addr, "/v1/chat/completions", &request).json();
        let mut config = common::greedy(24);
        config.stop = STOP_SEQUENCES.iter().map(|s| s.to_string()).collect();
        match field {
            "frequency_penalty" => config.sampling.frequency_penalty = value,
            _ => config.sampling.presence_penalty = value,
        }
        let want = vicuna_server::template::ReplyText::trim(&reference(&render_prompt(&messages), &config).1);
        assert_eq!(got["choices"][0]["message"]["content"], want, "{field}");
    }
}

#[test]
fn completions_take_a_prompt_as_token_ids() {
    let server = TestServer::with_defaults();
    let ids = load_tokenizer().encode(PROMPT, true);
    let complete = |prompt: Value| {
        let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0});
        post_json(server.addr, "/v1/completions", &body)
    };
    let want = complete(json!(PROMPT)).json()["choices"][0]["text"].clone();
    assert_eq!(complete(json!(ids)).json()["choices"][0]["text"], want, "ids are the text's tokens");
    assert_eq!(complete(json!([ids])).json()["choices"][0]["text"], want, "a list of one list of ids");
    let usage = complete(json!(ids)).json()["usage"].clone();
    assert_eq!(usage["prompt_tokens"], ids.len(), "ids are used as given (no second BOS)");
    for (prompt, mentions) in [
        (json!([]), "empty"),
        (json!([1, 32000]), "token id 32000"),
        (json!([[1, 2], [3]]), "one prompt"),
        (json!([1, -2]), "prompt"),
    ] {
        let message = complete(prompt.clone()).expect_error(422, "validation");
        assert!(message.contains(mentions), "{prompt}: {message}");
    }
}
