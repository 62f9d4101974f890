//! Clients nobody here wrote, against a real server: the Python `openai` and `huggingface_hub`
//! packages, and the chat page in headless Chromium driven by Playwright. Each compares what it
//! gets with the engine's own greedy output. Without python3 / the packages / node / Chromium the
//! test says why and skips, unless VICUNA_REQUIRE_REAL_CLIENTS=1 (then it fails).

mod common;

use std::path::Path;
use std::process::Command;

use common::{chat_reference, get, greedy, reference, skip_or_fail, test_options, TestServer};
use serde_json::json;
use vicuna_server::template::{ChatMessage, Role};

const PROMPT: &str = "### Human: Tell me about llamas.\n### Assistant:";

fn works(command: &mut Command) -> bool {
    command.output().is_ok_and(|o| o.status.success())
}

#[test]
fn python_openai_and_huggingface_hub_clients_get_complete_answers() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/real_clients.py");
    if !works(Command::new("python3").arg("--version")) {
        return skip_or_fail("python3 is not installed");
    }
    if !works(Command::new("python3").args(["-c", "import openai, huggingface_hub"])) {
        return skip_or_fail("the Python packages openai and huggingface_hub are not installed");
    }
    let max_tokens = 12;
    let (ids, completion) = reference(PROMPT, &greedy(max_tokens));
    let messages =
        [ChatMessage::new(Role::System, "Answer briefly."), ChatMessage::new(Role::User, "What is a llama?")];
    let chat_reply = chat_reference(&messages, 24);
    let expected = json!({
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "completion": completion,
        "completion_tokens": ids.len(),
        "prompt_tokens": common::load_tokenizer().encode(PROMPT, true).len(),
        "chat_messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is a llama?"},
        ],
        "chat_max_tokens": 24,
        "chat_reply": chat_reply,
    });

    let mut options = test_options();
    options.api_key = Some("client-test-key".into());
    let server = TestServer::start(options);
    let output = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", server.addr))
        .arg("client-test-key")
        .arg(expected.to_string())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the clients failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all clients ok"), "{stdout}");
}

#[test]
fn chat_page_streams_replies_in_headless_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !works(Command::new("node").arg("--version")) {
        return skip_or_fail("node is not installed");
    }
    if !dir.join("node_modules/playwright-core").is_dir() {
        return skip_or_fail("playwright-core is not installed (npm ci --prefix crates/server/tests/browser)");
    }
    if !Path::new(&chromium).exists() {
        return skip_or_fail(&format!("no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"));
    }
    // The page sends temperature 0 (greedy) and 24 max tokens for the first two turns.
    let first = [ChatMessage::new(Role::User, "What is a llama?")];
    let reply1 = chat_reference(&first, 24);
    let second = [
        first[0].clone(),
        ChatMessage::new(Role::Assistant, reply1.clone()),
        ChatMessage::new(Role::User, "And an alpaca?"),
    ];
    let reply2 = chat_reference(&second, 24);
    let server = TestServer::with_defaults();
    let info = get(server.addr, "/info").json();
    let expected = json!({
        "turns": [
            {"user": "What is a llama?", "reply": reply1},
            {"user": "And an alpaca?", "reply": reply2},
        ],
        "max_tokens": 24,
        "model_id": info["model_id"],
        "max_total_tokens": info["max_total_tokens"],
    });
    let mut node = Command::new("node");
    node.arg(dir.join("chat_page.mjs"))
        .arg(format!("http://{}", server.addr))
        .arg(expected.to_string())
        .env("CHROMIUM", &chromium)
        .current_dir(&dir);
    // VICUNA_SCREENSHOTS=docs/screenshots writes the page's screenshots there (relative to the
    // repository root), as committed.
    if let Some(folder) = std::env::var_os("VICUNA_SCREENSHOTS") {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        node.env("VICUNA_SCREENSHOTS", root.join(folder));
    }
    let output = node.output().expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("chat page ok"), "{stdout}");
    // The stopped reply was cancelled on the server, and its cache freed.
    assert!(server.metric("vicuna_requests_finished_total{reason=\"cancelled\"}") >= 1.0);
    server.wait_for_metric("vicuna_kv_cache_blocks_in_use", 0.0, std::time::Duration::from_secs(10));
}
