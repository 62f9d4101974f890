//! What the server tests share: the fixture model, a server started in this process on a free
//! loopback port, and a small HTTP/1.1 client (plain requests, and server-sent events read as
//! they arrive) written against the wire format, not against the server's code.

#![allow(dead_code)]

pub mod binary;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use vicuna_model::QuantLlama;
use vicuna_server::ServerOptions;
use vicuna_tokenizer::Tokenizer;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

pub fn model_dir() -> PathBuf {
    repo_root().join("tests/fixtures/models/tiny-v32001/safetensors-f16")
}

pub fn tokenizer_file() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizer/tokenizer.model")
}

pub fn load_model() -> QuantLlama {
    QuantLlama::load(&model_dir(), 2).expect("load the tiny fixture model")
}

pub fn load_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_file()).expect("load the LLaMA tokenizer")
}

/// The shipped demo chat model (models/demo/ship, trained by models/demo/recipe.sh), rebuilt as
/// README says: `apply-delta` of its base and delta, once per test binary, under the target folder.
pub fn demo_chat_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let ship = repo_root().join("models/demo/ship");
            // One folder per test process: test binaries run at once must not replace each other's.
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-chat-{}", std::process::id()));
            let request = vicuna_weights::DeltaRequest {
                op: vicuna_weights::DeltaOp::Apply,
                base: ship.join("base"),
                other: ship.join("delta"),
                out: out.clone(),
                force: true,
                verify: false,
                shard_size: u64::MAX,
                threads: 2,
            };
            let cancel = std::sync::atomic::AtomicBool::new(false);
            let mut progress = vicuna_weights::NoProgress;
            let mut control = vicuna_weights::JobControl { cancel: &cancel, progress: &mut progress };
            vicuna_weights::run_delta(&request, &mut control).expect("apply-delta of the shipped demo model");
            out
        })
        .clone()
}

/// A server running in this process on 127.0.0.1 with a port of the system's choosing; it shuts
/// down (gracefully) when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(options: ServerOptions) -> TestServer {
        Self::start_with(load_model(), load_tokenizer(), options)
    }

    /// A server of this model and tokenizer.
    pub fn start_with(model: QuantLlama, tokenizer: Tokenizer, options: ServerOptions) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let shutdown = async move {
                let _ = stopped.await;
            };
            vicuna_server::serve_on(listener, model, tokenizer, options, shutdown).expect("server runs");
        });
        let server = TestServer { addr, stop: Some(stop), thread: Some(thread) };
        server.wait_healthy();
        server
    }

    pub fn with_defaults() -> TestServer {
        Self::start(test_options())
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() && get(self.addr, "/health").status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server did not become healthy");
    }

    /// The value of an unlabelled metric, or of one with exactly these labels (`{reason="x"}`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = get(self.addr, "/metrics").text();
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Wait (bounded) until `metric` equals `value`.
    pub fn wait_for_metric(&self, name: &str, value: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.metric(name);
            if now == value {
                return;
            }
            assert!(Instant::now() < deadline, "{name} stayed at {now}, expected {value}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panicking test has already failed; only report the server's own failure otherwise.
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("the server thread failed");
            }
        }
    }
}

/// Options for tests: the fixture's name, short shutdown grace.
pub fn test_options() -> ServerOptions {
    ServerOptions { model_id: "tiny-v32001".into(), shutdown_grace: Duration::from_secs(2), ..ServerOptions::default() }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Assert a TGI-style error: this status and `{"error": "...", "error_type": kind}`; returns
    /// the message.
    pub fn expect_error(&self, status: u16, kind: &str) -> String {
        let body = self.json();
        assert_eq!(self.status, status, "{body}");
        assert_eq!(body["error_type"], kind, "{body}");
        let message = body["error"].as_str().expect("error message").to_string();
        assert!(!message.is_empty());
        message
    }
}

fn write_request(stream: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    // The server may answer (e.g. 413) before reading everything: a failed write is not an error
    // here, the response says what happened.
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body));
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            return (status, headers);
        }
        let (name, value) = line.split_once(':').expect("header has a colon");
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

/// One chunk of a chunked body; None at the last (empty) chunk.
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write_request(&mut stream, method, path, headers, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).expect("body");
    }
    Response { status, headers, body }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
}

/// A response of server-sent events, read event by event as they arrive. Dropping it closes the
/// connection.
pub struct EventStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    /// Body bytes received and not yet split into events.
    pending: Vec<u8>,
    /// Every body byte, to check the framing.
    pub raw: Vec<u8>,
    finished: bool,
}

impl EventStream {
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> EventStream {
        Self::open_with(addr, path, &[], body)
    }

    pub fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> EventStream {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        write_request(&mut stream, "POST", path, &all, body.to_string().as_bytes());
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        EventStream { status, headers, reader, pending: Vec::new(), raw: Vec::new(), finished: false }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `data` of the next event; None when the body ends.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.pending.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 event");
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(data.join("\n"));
            }
            if self.finished {
                assert!(
                    self.pending.is_empty(),
                    "body ends inside an event: {:?}",
                    String::from_utf8_lossy(&self.pending)
                );
                return None;
            }
            match read_chunk(&mut self.reader) {
                Some(chunk) => {
                    self.raw.extend_from_slice(&chunk);
                    self.pending.extend(chunk);
                }
                None => self.finished = true,
            }
        }
    }

    /// The next event parsed as JSON (None at the end, or at OpenAI's `[DONE]`).
    pub fn next_json(&mut self) -> Option<Value> {
        let data = self.next_data()?;
        if data == "[DONE]" {
            return None;
        }
        Some(serde_json::from_str(&data).unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}")))
    }

    /// Every remaining event's data.
    pub fn collect_data(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_data()).collect()
    }
}

/// What the engine alone generates for `prompt` (with BOS) under `config`: ids and text.
pub fn reference(prompt: &str, config: &vicuna_engine::GenerationConfig) -> (Vec<u32>, String) {
    let model = load_model();
    let tokenizer = load_tokenizer();
    let ids = tokenizer.encode(prompt, true);
    let generation = vicuna_engine::generate(&model, Some(&tokenizer), &ids, config, |_| {}).unwrap();
    (generation.ids, generation.text.unwrap())
}

pub fn greedy(max_new_tokens: usize) -> vicuna_engine::GenerationConfig {
    vicuna_engine::GenerationConfig {
        sampling: vicuna_engine::SamplingParams { do_sample: false, ..Default::default() },
        max_new_tokens,
        ..Default::default()
    }
}

/// The assistant's greedy reply to a conversation in the StableVicuna template, as the chat
/// route and `vicuna chat` should give it.
pub fn chat_reference(messages: &[vicuna_server::template::ChatMessage], max_new_tokens: usize) -> String {
    use vicuna_server::template::{render_prompt, ReplyText, STOP_SEQUENCES};
    let mut config = greedy(max_new_tokens);
    config.stop = STOP_SEQUENCES.iter().map(|s| s.to_string()).collect();
    ReplyText::trim(&reference(&render_prompt(messages), &config).1)
}

/// Whether a test that needs an outside program may skip when it is missing: not when
/// VICUNA_REQUIRE_REAL_CLIENTS=1 (CI, which installs them).
pub fn skip_or_fail(why: &str) {
    if std::env::var("VICUNA_REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("VICUNA_REQUIRE_REAL_CLIENTS=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
}
