//! The card's command line: `vicuna apply-delta --base LOCAL --delta ORG/NAME --target DIR`, with the delta
//! downloaded from a mock Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT) into a fresh cache (HF_HUB_CACHE), gives
//! the same bytes as with the local delta folder; then offline (HF_HUB_OFFLINE=1) from the cache alone; bad ids
//! and a private repo are one-line errors that say which, and what to do.

mod binary;
#[path = "../../weights/tests/mock_hub/mod.rs"]
mod mock_hub;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use binary::{assert_bad_input, assert_ok};
use mock_hub::{MockFile, MockHub, MockRepo};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// A fresh folder for one test, under the target's temporary folder (kept for a look after a failure, replaced
/// by the next run).
fn test_dir(tag: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hub-cli-{tag}"));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

/// `vicuna ARGS` with the Hub at `endpoint` and the cache in `cache`, nothing from the caller's environment.
fn vicuna(cache: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicuna"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", cache.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("the vicuna binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every file of a folder with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn apply(cache: &Path, endpoint: &str, delta: &str, target: &Path) -> Output {
    let base = fixture("delta/base");
    let args =
        ["apply-delta", "--base", base.to_str().unwrap(), "--delta", delta, "--target", target.to_str().unwrap()];
    vicuna(cache, endpoint, &[&args[..], &["--quiet", "--shard-size", "100KB"]].concat())
}

#[test]
fn apply_delta_with_a_hub_id_gives_the_same_bytes_as_with_the_local_delta() {
    let server = MockHub::start(vec![MockRepo::from_dir("CarperAI/tiny-delta", COMMIT, &fixture("delta/delta"))]);
    let tmp = test_dir("apply");
    let cache = tmp.join("cache");

    let local = apply(&cache, &server.url, fixture("delta/delta").to_str().unwrap(), &tmp.join("local"));
    assert_ok(&local);
    assert!(server.log().is_empty(), "a local folder needs no Hub");

    let hub = apply(&cache, &server.url, "CarperAI/tiny-delta", &tmp.join("hub"));
    assert_ok(&hub);
    assert_eq!(files(&tmp.join("hub")), files(&tmp.join("local")), "the same target, file by file");
    assert_eq!(hub.stdout, local.stdout, "the same manifest");
    assert!(server.log().iter().any(|r| r.path == "/api/models/CarperAI/tiny-delta/revision/main"));
    let snapshot = cache.join("models--CarperAI--tiny-delta/snapshots").join(COMMIT);
    assert_eq!(files(&snapshot), files(&fixture("delta/delta")));

    // Offline, from the cache alone (the endpoint is gone), by branch and by commit.
    server.clear_log();
    for (i, id) in ["CarperAI/tiny-delta@main".to_string(), format!("CarperAI/tiny-delta@{COMMIT}")].iter().enumerate()
    {
        let target = tmp.join(format!("offline-{i}"));
        let output = Command::new(env!("CARGO_BIN_EXE_vicuna"))
            .args(["apply-delta", "--base", fixture("delta/base").to_str().unwrap(), "--delta", id])
            .args(["--target", target.to_str().unwrap(), "--quiet", "--shard-size", "100KB"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(output.status.success(), "{id}: {}", stderr(&output));
        assert_eq!(files(&target), files(&tmp.join("local")), "{id}");
    }
    assert!(server.log().is_empty());
}

#[test]
fn bad_ids_and_private_repos_are_one_line_errors_that_say_which() {
    let server = MockHub::start(vec![MockRepo::from_dir("CarperAI/private", COMMIT, &fixture("delta/delta"))]);
    server.require_token("hf_secret");
    let tmp = test_dir("errors");
    let cache = tmp.join("cache");
    let target = tmp.join("target");
    assert_bad_input(
        &apply(&cache, &server.url, "CarperAI/private", &target),
        &["--delta CarperAI/private", "401", "set HF_TOKEN"],
    );
    assert_bad_input(
        &apply(&cache, "http://127.0.0.1:9", "CarperAI/tiny-delta", &target),
        &["--delta", "cannot reach", "HF_HUB_OFFLINE=1"],
    );
    // Neither an existing path nor an id: the usual message.
    assert_bad_input(&apply(&cache, &server.url, "./nowhere", &target), &["--delta ./nowhere", "no such folder"]);
    assert!(!target.exists(), "no target from a failed run");

    // With the token: served, and the token was sent.
    let base = fixture("delta/base");
    let output = Command::new(env!("CARGO_BIN_EXE_vicuna"))
        .args(["apply-delta", "--base", base.to_str().unwrap(), "--delta", "CarperAI/private"])
        .args(["--target", target.to_str().unwrap(), "--quiet"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_TOKEN", "hf_secret")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert_ok(&output);
    assert!(server.log().iter().any(|r| r.header("authorization") == Some("Bearer hf_secret")));
}

#[test]
fn tokenize_with_a_hub_id_fetches_only_the_tokenizer_files() {
    let mut repo = MockRepo::from_dir("org/tok", COMMIT, &fixture("tokenizer"));
    repo.files.push(MockFile::new("model.safetensors", vec![0; 4096]));
    let server = MockHub::start(vec![repo]);
    let tmp = test_dir("tokenize");
    let cache = tmp.join("cache");
    let text = "Hello world, this is vicuna: ünïcode too.";
    let local_dir = fixture("tokenizer");
    let local =
        vicuna(&cache, &server.url, &["tokenize", "--model", local_dir.to_str().unwrap(), "--text", text, "--json"]);
    assert_ok(&local);
    let hub = vicuna(&cache, &server.url, &["tokenize", "--model", "org/tok", "--text", text, "--json"]);
    assert_ok(&hub);
    assert_eq!(hub.stdout, local.stdout);
    let snapshot = cache.join("models--org--tok/snapshots").join(COMMIT);
    assert!(snapshot.join("tokenizer.model").is_file() && snapshot.join("tokenizer.json").is_file());
    assert!(!snapshot.join("model.safetensors").exists(), "the weights stay on the Hub");
    assert!(!snapshot.join("expected_tokenization.json").exists(), "and so do files the tokenizer does not read");
}

/// One HTTP/1.1 request to the server at `address` (`Connection: close`): status and body.
fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the server accepts connections");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

/// Stops the server process of a test, whatever happens to the test.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// vLLM's `POST /v1/load_lora_adapter` takes a Hub id as `lora_path`: a running `vicuna serve` downloads the
/// adapter from the mock Hub into the cache and serves it by its name, with the same greedy text as
/// `vicuna generate --lora` of the local adapter folder (and another text than the base model's).
#[test]
fn load_lora_adapter_takes_a_hub_id() {
    let tmp = test_dir("lora");
    let cache = tmp.join("cache");
    let base = fixture("models/tiny-v32001/safetensors-f16");
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let (base, tokenizer) = (base.to_str().unwrap(), tokenizer.to_str().unwrap());
    let adapter = tmp.join("adapter");
    binary::train_fruit_adapter(&tmp, &adapter, "q_proj,v_proj", "2", false);
    let server = MockHub::start(vec![MockRepo::from_dir("org/fruit-lora", COMMIT, &adapter)]);

    let prompt = "### Human: Name a fruit.\n### Assistant:";
    let generate = |lora: &[&str]| {
        let args = [&["generate", "--model", base, "--tokenizer", tokenizer, "--prompt", prompt][..], lora];
        let args = [&args.concat()[..], &["--greedy", "--max-new-tokens", "8", "--json"]].concat();
        let output = vicuna(&cache, &server.url, &args);
        assert_ok(&output);
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["text"].as_str().unwrap().to_string()
    };
    let want = generate(&["--lora", adapter.to_str().unwrap()]);
    assert_ne!(want, generate(&[]), "the adapter changes the text");
    assert!(server.log().is_empty(), "local folders need no Hub");

    let mut child = Command::new(env!("CARGO_BIN_EXE_vicuna"))
        .args(["-t", "1", "serve", "--model", base, "--tokenizer", tokenizer, "--port", "0"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", cache.join("hf-home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let serving = Serving(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let address = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("{line:?}")).to_string();

    let load = r#"{"lora_name": "fruit", "lora_path": "org/fruit-lora"}"#;
    let (status, body) = http(&address, "POST", "/v1/load_lora_adapter", load);
    assert_eq!(status, 200, "{body}");
    assert!(server.log().iter().any(|r| r.path.contains("adapter_model.safetensors")), "fetched from the Hub");
    let snapshot = cache.join("models--org--fruit-lora/snapshots").join(COMMIT);
    assert_eq!(files(&snapshot), files(&adapter), "the adapter, file by file, in the cache");

    let request = serde_json::json!({"model": "fruit", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let (status, body) = http(&address, "POST", "/v1/completions", &request.to_string());
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["choices"][0]["text"], want.as_str(), "{body}");

    let missing = r#"{"lora_name": "other", "lora_path": "org/no-such-lora"}"#;
    let (status, body) = http(&address, "POST", "/v1/load_lora_adapter", missing);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("org/no-such-lora"), "{body}");
    drop(serving);
}
