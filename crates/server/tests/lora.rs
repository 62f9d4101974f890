//! LoRA adapters served beside the base model, against an independent reference: adapters trained by `vicuna
//! train sft --lora-rank` on the fixture, and the same training run with `--merge` (the adapter folded into the
//! weights by the training code), generated from by the engine alone. A request names its adapter by OpenAI's
//! `model` or TGI's `adapter_id`; one batch mixes adapters and the base; cached prefixes never cross adapters;
//! adapters load and unload at run time behind the API key; and the real `openai` client picks them by `model`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::binary::{path, vicuna_binary};
use common::{get, model_dir, post_json, request, skip_or_fail, test_options, tokenizer_file, TestServer};
use serde_json::{json, Value};
use vicuna_model::QuantLlama;

const PROMPT: [u32; 9] = [1, 835, 29871, 13, 1576, 263, 15774, 29889, 13];
const MAX_TOKENS: usize = 16;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An adapter trained on a few chats about `name` (with `merge`: the same run's merged model, `NAME-merged`).
fn train(dir: &Path, name: &str, targets: &str, seed: &str, merge: bool) -> PathBuf {
    let data = dir.join(format!("{name}.jsonl"));
    let rows: String = (0..12)
        .map(|i| {
            json!({"prompt": format!("Count to {i}."), "response": format!("{name} {i} {name}.")}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.join(if merge { format!("{name}-merged") } else { name.to_string() });
    let mut command = Command::new(vicuna_binary());
    command.args(["train", "sft", "--model", path(&model_dir()), "--tokenizer", path(&tokenizer_file())]);
    command.args(["--data", path(&data), "--out", path(&out), "--epochs", "2", "--batch-size", "4", "--lr", "2e-2"]);
    command.args(["--seed", seed, "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", targets]);
    if merge {
        command.arg("--merge");
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "training failed: {}", String::from_utf8_lossy(&output.stderr));
    out
}

/// Greedy text of `model` (a folder) for the prompt, by the engine alone.
fn engine_text(model: &Path, lora: Option<&Path>) -> String {
    let mut model = QuantLlama::load(model, 2).unwrap();
    if let Some(dir) = lora {
        model.set_lora(Some(std::sync::Arc::new(model.load_lora(dir).unwrap()))).unwrap();
    }
    let tokenizer = common::load_tokenizer();
    let mut config = common::greedy(MAX_TOKENS);
    config.ignore_eos = true;
    vicuna_engine::generate(&model, Some(&tokenizer), &PROMPT, &config, |_| {}).unwrap().text.unwrap()
}

fn completion(addr: std::net::SocketAddr, body: Value) -> Value {
    let response = post_json(addr, "/v1/completions", &body);
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

fn greedy_body(model: &str) -> Value {
    json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true})
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn adapters_are_served_per_request_batched_together_and_equal_their_merged_models() {
    let dir = Dir(std::env::temp_dir().join(format!("vicuna-serve-lora-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let a = train(&dir.0, "alpha", "q_proj,v_proj", "3", false);
    let a_merged = train(&dir.0, "alpha", "q_proj,v_proj", "3", true);
    let b = train(&dir.0, "beta", "q_proj,k_proj,o_proj,up_proj,down_proj", "4", false);
    let want_a = engine_text(&a_merged, None);
    let want_b = engine_text(&model_dir(), Some(&b));
    let want_base = engine_text(&model_dir(), None);
    assert!(want_a != want_base && want_b != want_base, "training must change the greedy text");

    let mut options = test_options();
    options.loras = vec![("alpha".into(), a.clone()), ("beta".into(), b.clone())];
    options.max_loras = 2;
    let server = TestServer::start(options);
    let addr = server.addr;

    let models = get(addr, "/v1/models").json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny-v32001", "alpha", "beta"]);
    assert_eq!(models["data"][1]["parent"], "tiny-v32001");

    // The base first: its cached prompt must not serve the adapter's request for the same prompt.
    assert_eq!(text(&completion(addr, greedy_body("tiny-v32001"))), want_base);
    let answer = completion(addr, greedy_body("alpha"));
    assert_eq!(text(&answer), want_a, "alpha served = alpha merged");
    assert_eq!(answer["model"], "alpha");
    assert_eq!(answer["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "no base blocks for alpha");
    assert_eq!(text(&completion(addr, greedy_body("beta"))), want_b);
    // TGI's adapter_id picks the same adapter.
    let tgi = post_json(
        addr,
        "/generate",
        &json!({"inputs": "Count to 3.", "parameters": {"adapter_id": "alpha",
        "max_new_tokens": 8, "decoder_input_details": false}}),
    );
    let openai =
        completion(addr, json!({"model": "alpha", "prompt": "Count to 3.", "max_tokens": 8, "temperature": 0}));
    assert_eq!(tgi.json()["generated_text"].as_str().unwrap(), text(&openai));

    // Seeded requests for the base and both adapters, alone and then all at once.
    let sampled = |model: &str, seed: u64| {
        json!({"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": seed,
               "ignore_eos": true})
    };
    let requests: Vec<Value> = ["tiny-v32001", "alpha", "beta", "alpha", "tiny-v32001", "beta"]
        .iter()
        .enumerate()
        .map(|(i, m)| sampled(m, 100 + i as u64))
        .collect();
    let alone: Vec<String> = requests.iter().map(|r| text(&completion(addr, r.clone()))).collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            requests.iter().map(|r| scope.spawn(move || text(&completion(addr, r.clone())))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone, "each request of a mixed batch gets its text alone");

    // An unknown model is refused while adapters are served.
    let response = post_json(addr, "/v1/completions", &greedy_body("gamma"));
    assert_eq!(response.status, 404, "{}", response.text());
    assert!(response.text().contains("/v1/models"), "{}", response.text());
    let response = post_json(addr, "/generate", &json!({"inputs": "x", "parameters": {"adapter_id": "gamma"}}));
    assert_eq!(response.status, 404, "{}", response.text());

    let metrics = get(addr, "/metrics").text();
    assert!(
        metrics
            .contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}"),
        "{metrics}"
    );
}

#[test]
fn adapters_load_and_unload_at_run_time_behind_the_api_key() {
    let dir = Dir(std::env::temp_dir().join(format!("vicuna-serve-lora-load-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let a = train(&dir.0, "gamma", "v_proj", "6", false);
    let want = engine_text(&model_dir(), Some(&a));
    let mut options = test_options();
    options.api_key = Some("lora-key".into());
    let server = TestServer::start(options);
    let addr = server.addr;
    let auth = [("Authorization", "Bearer lora-key"), ("Content-Type", "application/json")];
    let post = |route: &str, body: &Value, headers: &[(&str, &str)]| {
        request(addr, "POST", route, headers, body.to_string().as_bytes())
    };
    let load = json!({"lora_name": "gamma", "lora_path": a});
    assert_eq!(post("/v1/load_lora_adapter", &load, &auth[1..]).status, 401, "the key is required");
    let response = post("/v1/load_lora_adapter", &load, &auth);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(post("/v1/load_lora_adapter", &load, &auth).status, 400, "a second adapter of one name");
    let bad = json!({"lora_name": "bad", "lora_path": dir.0.join("nowhere")});
    let response = post("/v1/load_lora_adapter", &bad, &auth);
    assert_eq!(response.status, 400);
    assert!(response.text().contains("no such folder"), "{}", response.text());

    let answer = post("/v1/completions", &greedy_body("gamma"), &auth);
    assert_eq!(text(&answer.json()), want);
    let response = request(addr, "GET", "/v1/models", &auth, b"");
    assert_eq!(response.json()["data"].as_array().unwrap().len(), 2);
    // /info lists what is loaded now.
    let info = request(addr, "GET", "/info", &auth, b"").json();
    assert_eq!(info["lora_adapters"][0]["name"], "gamma", "{info}");
    assert_eq!(info["lora_adapters"][0]["path"], json!(a), "{info}");

    let unload = json!({"lora_name": "gamma"});
    assert_eq!(post("/v1/unload_lora_adapter", &unload, &auth).status, 200);
    assert_eq!(request(addr, "GET", "/info", &auth, b"").json()["lora_adapters"], json!([]));
    assert_eq!(post("/v1/unload_lora_adapter", &unload, &auth).status, 404);
    // With no adapter left, any name is the base model again.
    let answer = post("/v1/completions", &greedy_body("gamma"), &auth);
    assert_eq!(text(&answer.json()), engine_text(&model_dir(), None));
}

#[test]
fn the_openai_client_picks_adapters_by_model() {
    if !Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success()) {
        return skip_or_fail("python3 with the openai package is not installed");
    }
    let dir = Dir(std::env::temp_dir().join(format!("vicuna-serve-lora-client-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let a = train(&dir.0, "delta", "q_proj,v_proj", "7", false);
    let want = engine_text(&model_dir(), Some(&a));
    let mut options = test_options();
    options.loras = vec![("delta".into(), a)];
    let server = TestServer::start(options);
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
ids = [m.id for m in client.models.list().data]
assert ids == ["tiny-v32001", "delta"], ids
out = client.completions.create(model="delta", prompt=[int(t) for t in sys.argv[2].split(",")],
                                max_tokens=int(sys.argv[3]), temperature=0, extra_body={"ignore_eos": True})
assert out.model == "delta", out.model
sys.stdout.write(out.choices[0].text)
"#;
    let prompt: Vec<String> = PROMPT.iter().map(u32::to_string).collect();
    let output = Command::new("python3")
        .args(["-c", script, &format!("http://{}", server.addr), &prompt.join(","), &MAX_TOKENS.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), want);
}
