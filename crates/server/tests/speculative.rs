//! Speculative decoding in the server (`vicuna serve --lookup` / `--draft-model`): every decoding
//! sequence of the batch guesses, one ragged pass checks all the guesses, refused positions leave
//! the paged cache. Checked on the shipped demo chat model (a trained model, so guesses are both
//! kept and refused) against the same server without speculation: greedy replies are the same
//! token for token in a batch that mixes plain, prompt-scoring, stop-sequence, grammar and n = 2
//! requests, and stay the same in a second round whose prompts continue the first (read from
//! prefix-cache blocks written while speculating, which catches stale K/V of refused guesses); a
//! seeded sampled request gives the same text alone and in the batch; what was guessed and kept is
//! reported per request and on /metrics.

mod common;

use std::sync::Arc;

use common::{demo_chat_dir, get, post_json, test_options, TestServer};
use serde_json::{json, Value};
use vicuna_engine::DraftLimits;
use vicuna_model::native::{KvType, OwnedTensors};
use vicuna_model::{LlamaConfig, QuantLlama};
use vicuna_server::{ServerOptions, Speculation};
use vicuna_tokenizer::Tokenizer;
use vicuna_weights::Checkpoint;

/// Prompts that copy (where lookup finds its guesses) and prompts that do not.
const PROMPTS: [&str; 4] = [
    "### Human: Repeat after me: the big red house is on the hill, the big red house is on the hill.\n### Assistant:",
    "### Human: What is a house?\n### Assistant:",
    "### Human: Say hello hello hello hello hello hello.\n### Assistant:",
    "### Human: Tell me about a cat and a dog.\n### Assistant:",
];

const NEW_TOKENS: usize = 40;

fn load(dir: &std::path::Path, kv: KvType) -> QuantLlama {
    let config = LlamaConfig::from_dir(dir).unwrap();
    let tensors = OwnedTensors::from_checkpoint(&config, &Checkpoint::open(dir).unwrap()).unwrap();
    QuantLlama::with_kv_type(config, Arc::new(tensors), 2, Some(kv)).unwrap()
}

fn demo_server(kv: KvType, speculation: Option<Speculation>) -> TestServer {
    let dir = demo_chat_dir();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap().expect("the demo model has a tokenizer");
    TestServer::start_with(load(&dir, kv), tokenizer, ServerOptions { speculation, ..test_options() })
}

fn generate(server: &TestServer, inputs: &str, parameters: Value) -> Value {
    let response = post_json(server.addr, "/generate", &json!({"inputs": inputs, "parameters": parameters}));
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

fn greedy_parameters() -> Value {
    json!({"max_new_tokens": NEW_TOKENS, "details": true, "do_sample": false})
}

fn sampled_parameters() -> Value {
    json!({"max_new_tokens": NEW_TOKENS, "details": true, "do_sample": true, "temperature": 0.9, "top_k": 40, "seed": 7})
}

fn ids(response: &Value) -> Vec<u64> {
    response["details"]["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect()
}

/// Guessed tokens of a `/generate` reply: (checked, kept).
fn speculated(response: &Value) -> (u64, u64) {
    let details = &response["details"];
    (details["drafted_tokens"].as_u64().unwrap_or(0), details["accepted_tokens"].as_u64().unwrap_or(0))
}

/// What one round sends, all at once, so that the requests share the batch's steps.
struct Round {
    /// `/generate`, greedy, one per prompt (the first also scores its prompt).
    greedy: Vec<Value>,
    /// `/generate` with a stop sequence.
    stopped: Value,
    /// `/generate` with a regex grammar (decodes without guesses).
    grammar: Value,
    /// `/v1/completions`, n = 2, temperature 0: both choices are the greedy reply.
    two: Value,
    /// `/generate`, sampled with a seed.
    sampled: Value,
}

fn round(server: &TestServer, prompts: &[String]) -> Round {
    std::thread::scope(|s| {
        let greedy: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut parameters = greedy_parameters();
                if i == 0 {
                    parameters["decoder_input_details"] = json!(true);
                }
                s.spawn(move || generate(server, p, parameters))
            })
            .collect();
        let stopped = s.spawn(|| {
            let mut parameters = greedy_parameters();
            parameters["stop"] = json!(["e"]);
            generate(server, &prompts[1], parameters)
        });
        let grammar = s.spawn(|| {
            let mut parameters = greedy_parameters();
            parameters["grammar"] = json!({"type": "regex", "value": "[a-z ]{1,30}\\."});
            generate(server, &prompts[3], parameters)
        });
        let two = s.spawn(|| {
            let body = json!({"prompt": prompts[2], "max_tokens": NEW_TOKENS, "temperature": 0, "n": 2});
            let response = post_json(server.addr, "/v1/completions", &body);
            assert_eq!(response.status, 200, "{}", response.text());
            response.json()
        });
        let sampled = s.spawn(|| generate(server, &prompts[0], sampled_parameters()));
        Round {
            greedy: greedy.into_iter().map(|h| h.join().unwrap()).collect(),
            stopped: stopped.join().unwrap(),
            grammar: grammar.join().unwrap(),
            two: two.join().unwrap(),
            sampled: sampled.join().unwrap(),
        }
    })
}

/// The second round's prompts: each first-round conversation goes on.
fn follow_ups(replies: &Round, prompts: &[String]) -> Vec<String> {
    prompts
        .iter()
        .zip(&replies.greedy)
        .map(|(p, r)| {
            format!("{p}{}\n### Human: Say that again.\n### Assistant:", r["generated_text"].as_str().unwrap())
        })
        .collect()
}

/// Both servers' rounds give the same greedy replies; returns the guesses (checked, kept) of the
/// speculating server's `/generate` replies.
fn compare(fast: &Round, plain: &Round, what: &str) -> (u64, u64) {
    let (mut drafted, mut accepted) = (0, 0);
    for (i, (f, p)) in fast.greedy.iter().zip(&plain.greedy).enumerate() {
        assert_eq!(ids(f), ids(p), "{what}: prompt {i}: greedy tokens differ with speculation");
        assert_eq!(f["generated_text"], p["generated_text"], "{what}: prompt {i}");
        assert_eq!(f["details"]["prefill"], p["details"]["prefill"], "{what}: prompt {i}: prompt scores");
        let (d, a) = speculated(f);
        assert!(a <= d, "{what}: kept more guesses than were checked: {f}");
        drafted += d;
        accepted += a;
    }
    assert_eq!(ids(&fast.stopped), ids(&plain.stopped), "{what}: with a stop sequence");
    assert_eq!(fast.stopped["generated_text"], plain.stopped["generated_text"], "{what}: with a stop sequence");
    assert_eq!(ids(&fast.grammar), ids(&plain.grammar), "{what}: with a grammar");
    assert_eq!(speculated(&fast.grammar).0, 0, "{what}: structured output decodes without guesses");
    let texts =
        |r: &Value| -> Vec<Value> { r["choices"].as_array().unwrap().iter().map(|c| c["text"].clone()).collect() };
    assert_eq!(texts(&fast.two), texts(&plain.two), "{what}: n = 2");
    assert_eq!(texts(&fast.two)[0], texts(&fast.two)[1], "{what}: greedy choices agree");
    (drafted, accepted)
}

fn check_speculation(kv: KvType, speculation: Speculation, what: &str) {
    let prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    let p_min = speculation.limits.p_min;
    let fast = demo_server(kv, Some(speculation));
    let plain = demo_server(kv, None);
    let info = get(fast.addr, "/info").json();
    assert_eq!(info["speculation"]["draft_max"], 6, "{info}");
    assert_eq!(info["speculation"]["draft_p_min"].as_f64(), Some(f64::from(p_min)), "{info}");

    let (fast_1, plain_1) = (round(&fast, &prompts), round(&plain, &prompts));
    let (d1, a1) = compare(&fast_1, &plain_1, &format!("{what}, round 1"));
    let next = follow_ups(&plain_1, &prompts);
    let (fast_2, plain_2) = (round(&fast, &next), round(&plain, &next));
    let (d2, a2) = compare(&fast_2, &plain_2, &format!("{what}, round 2"));
    assert!(fast.metric("vicuna_prefix_cache_hit_tokens_total") > 0.0, "{what}: round 2 reads what round 1 cached");
    let (drafted, accepted) = (d1 + d2, a1 + a2);
    assert!(accepted > 0, "{what}: no guess was kept ({drafted} checked): the test would not see a kept guess");
    assert!(accepted < drafted, "{what}: every guess was kept: the test would not see a refused one");
    // The counters include the requests whose details are not shown (n = 2, the sampled ones).
    assert!(fast.metric("vicuna_speculative_drafted_tokens_total") >= drafted as f64);
    assert!(fast.metric("vicuna_speculative_accepted_tokens_total") >= accepted as f64);
    assert_eq!(plain.metric("vicuna_speculative_drafted_tokens_total"), 0.0);
    assert!(speculated(&plain_1.greedy[0]) == (0, 0) && plain_1.greedy[0]["details"].get("drafted_tokens").is_none());

    // A seeded sampled request: the same text alone as in the batch (its guesser is its own).
    let alone = generate(&fast, &prompts[0], sampled_parameters());
    assert_eq!(alone["generated_text"], fast_1.sampled["generated_text"], "{what}: seeded sampling repeats");
    assert_eq!(ids(&alone), ids(&fast_1.sampled), "{what}: seeded sampling repeats");
}

const LIMITS: DraftLimits = DraftLimits { max: 6, min: 1, p_min: 0.0 };

#[test]
fn prompt_lookup_keeps_greedy_replies_in_a_mixed_batch() {
    check_speculation(KvType::F16, Speculation { draft_model: None, limits: LIMITS }, "lookup");
}

#[test]
fn a_draft_model_keeps_greedy_replies_in_a_mixed_batch() {
    // The demo's base model (before its chat tuning) drafts for the chat model: same vocabulary,
    // related weights, so it agrees often but not always.
    let draft = load(&common::repo_root().join("models/demo/ship/base"), KvType::F32);
    // With --draft-p-min: the draft stops at tokens it is unsure of; replies are still the plain server's.
    let limits = DraftLimits { p_min: 0.3, ..LIMITS };
    check_speculation(KvType::F32, Speculation { draft_model: Some(Arc::new(draft)), limits }, "draft model");
}

#[test]
fn a_draft_model_of_another_vocabulary_is_refused_at_start() {
    let dir = demo_chat_dir();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let draft = load(&common::repo_root().join("tests/fixtures/models/tiny-a/safetensors-f32"), KvType::F32);
    let options = ServerOptions {
        speculation: Some(Speculation { draft_model: Some(Arc::new(draft)), limits: LIMITS }),
        ..test_options()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let error = vicuna_server::serve_on(listener, load(&dir, KvType::F16), tokenizer, options, async {})
        .expect_err("a draft of another vocabulary cannot serve")
        .to_string();
    assert!(error.contains("--draft-model") && error.contains("512") && error.contains("32001"), "{error}");
}

/// Each sequence keeps a cache of the draft model as long as its own, so the default KV budget (4 GiB when
/// `--max-batch-total-tokens` is not given) counts the draft's bytes per token beside the model's.
#[test]
fn the_default_kv_budget_pays_for_the_draft_cache_too() {
    let dir = demo_chat_dir();
    let budget_tokens = |speculation: Option<Speculation>| {
        let tokenizer = Tokenizer::from_dir(&dir).unwrap().unwrap();
        let model = load(&dir, KvType::F32);
        let draft_bytes =
            speculation.as_ref().and_then(|s| s.draft_model.as_ref()).map_or(0, |d| d.kv_bytes_per_token());
        let per_token = model.kv_bytes_per_token() + draft_bytes;
        // Enough concurrent requests that the byte budget, not the request count, sets the token budget.
        let options = ServerOptions { speculation, max_concurrent_requests: 1 << 20, ..test_options() };
        let server = TestServer::start_with(model, tokenizer, options);
        let info = common::get(server.addr, "/info").json();
        (info["max_batch_total_tokens"].as_u64().unwrap() as usize, per_token)
    };
    let (alone, model_bytes) = budget_tokens(None);
    assert_eq!(alone, (4usize << 30) / model_bytes);
    let draft = load(&common::repo_root().join("models/demo/ship/base"), KvType::F32);
    let speculation = Speculation { draft_model: Some(Arc::new(draft)), limits: LIMITS };
    let (with_draft, both_bytes) = budget_tokens(Some(speculation));
    assert!(both_bytes > model_bytes);
    assert_eq!(with_draft, (4usize << 30) / both_bytes);
    // Lookup keeps no second cache.
    let (lookup, _) = budget_tokens(Some(Speculation { draft_model: None, limits: LIMITS }));
    assert_eq!(lookup, alone);
}
