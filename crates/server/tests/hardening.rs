//! A server that cannot be stalled or held: huge prompts are refused by their bytes before they are
//! tokenized and tokenized off the async threads when allowed, connections that never finish their
//! request head are closed, browsers on other origins get CORS answers, `HEAD` answers like `GET`,
//! and an OpenAI stream cut short by shutdown still ends with `data: [DONE]`.
//!
//! The tests that watch the server's memory or signal it run the real `vicuna serve` binary (see
//! `common/binary.rs`); the rest run a server in this process.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::binary::{sigterm, start_server, wait_exit};
use common::{get, post_json, request, test_options, EventStream, TestServer};
use serde_json::{json, Value};

/// Resident memory of a process in MB (Linux `/proc/PID/status`).
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb / 1024.0
}

/// English-like text of exactly `bytes` bytes (~4 bytes a token, as real prose).
fn prose(bytes: usize) -> String {
    let sentence = "The quick brown fox jumps over the lazy dog while the llama watches. ";
    let mut text = sentence.repeat(bytes / sentence.len() + 1);
    text.truncate(bytes);
    text
}

/// How long `GET /health` takes, on a fresh connection each time: `count` probes `every` apart,
/// sorted.
fn health_latencies(addr: SocketAddr, count: usize, every: Duration) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = (0..count)
        .map(|_| {
            let start = Instant::now();
            assert_eq!(get(addr, "/health").status, 200);
            let took = start.elapsed();
            std::thread::sleep(every);
            took
        })
        .collect();
    latencies.sort();
    latencies
}

/// A POST whose body is sent by a thread of its own: `sent` gets a message once the whole body is
/// written (the server has it, or is reading it), and the thread returns the status, the body and
/// when the answer came.
fn post_in_background(
    addr: SocketAddr,
    path: &'static str,
    body: Value,
    sent: mpsc::Sender<()>,
) -> std::thread::JoinHandle<(u16, String, Instant)> {
    std::thread::spawn(move || {
        let body = body.to_string();
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes()));
        let _ = sent.send(());
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("read the answer");
        let answered = Instant::now();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = answer.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
        (status, body, answered)
    })
}

fn small_generation(addr: SocketAddr) -> Value {
    let response =
        post_json(addr, "/generate", &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": true}}));
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

/// The median of sorted latencies.
fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

/// Four 2 MB prompts against the defaults: each is refused by its bytes (naming the flag) without
/// being tokenized, `/health` stays fast meanwhile, a small generation goes through, and the
/// memory the bodies took comes back.
#[test]
fn four_2mb_prompts_are_refused_by_their_bytes_without_stalling_or_keeping_memory() {
    // A body limit above 2 MB, so that the prompt's own limit is what refuses them.
    let (mut child, addr) = start_server(&["--payload-limit", "2500000"]);
    small_generation(addr);
    let before = rss_mb(child.id());
    let prompt = prose(2_000_000);
    let (sent, written) = mpsc::channel();
    let bodies = [
        ("/generate", json!({"inputs": prompt, "parameters": {"max_new_tokens": 4}})),
        ("/tokenize", json!({"inputs": prompt})),
        ("/v1/completions", json!({"model": "m", "prompt": prompt, "max_tokens": 4})),
        ("/v1/chat/completions", json!({"model": "m", "messages": [{"role": "user", "content": prompt}]})),
    ];
    let big: Vec<_> =
        bodies.into_iter().map(|(path, body)| (path, post_in_background(addr, path, body, sent.clone()))).collect();
    for _ in 0..4 {
        written.recv_timeout(Duration::from_secs(60)).expect("a big body was sent");
    }
    let latencies = health_latencies(addr, 9, Duration::from_millis(10));
    assert!(median(&latencies) < Duration::from_millis(100), "/health took {latencies:?}");
    assert!(small_generation(addr)["generated_text"].is_string());
    for (path, thread) in big {
        let (status, body, _) = thread.join().unwrap();
        assert_eq!(status, 422, "{path}: {body}");
        // Named with the limit: 2047 tokens x 27 bytes (the chat template adds to the prompt).
        assert!(body.contains("--max-input-bytes") && body.contains("55269"), "{path}: {body}");
    }
    let after = rss_mb(child.id());
    assert!(after < before + 100.0, "RSS went from {before:.0} MB to {after:.0} MB");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

/// With the byte limit raised, four 2 MB prompts are tokenized (on the blocking pool) while
/// `/health` keeps answering fast and a small generation completes; then they are refused by
/// their token count, and the memory tokenizing took comes back.
#[test]
fn tokenizing_four_2mb_prompts_does_not_stall_health_or_generation() {
    let (mut child, addr) = start_server(&["--payload-limit", "2500000", "--max-input-bytes", "2100000"]);
    small_generation(addr);
    let before = rss_mb(child.id());
    let prompt = prose(2_000_000);
    let (sent, written) = mpsc::channel();
    let big: Vec<_> = (0..4)
        .map(|i| {
            let (path, body) = if i % 2 == 0 {
                ("/generate", json!({"inputs": prompt, "parameters": {"max_new_tokens": 4}}))
            } else {
                ("/v1/completions", json!({"model": "m", "prompt": prompt, "max_tokens": 4}))
            };
            (path, post_in_background(addr, path, body, sent.clone()))
        })
        .collect();
    for _ in 0..4 {
        written.recv_timeout(Duration::from_secs(60)).expect("a big body was sent");
    }
    let probing = Instant::now();
    let latencies = health_latencies(addr, 9, Duration::from_millis(20));
    let generated = Instant::now();
    assert!(small_generation(addr)["generated_text"].is_string());
    let generation_took = generated.elapsed();
    let probed = Instant::now();
    let mut last_answer = probing;
    for (path, thread) in big {
        let (status, body, answered) = thread.join().unwrap();
        assert_eq!(status, 422, "{path}: {body}");
        assert!(body.contains("--max-input-tokens"), "{path}: {body}");
        last_answer = last_answer.max(answered);
    }
    // Only meaningful if the big prompts were still being tokenized while /health was asked.
    assert!(
        last_answer > probed,
        "the big prompts were answered before the probes ended: make them bigger ({:?} after the probes began)",
        last_answer - probing
    );
    assert!(median(&latencies) < Duration::from_millis(100), "/health took {latencies:?}");
    assert!(generation_took < Duration::from_secs(10), "a 4-token generation took {generation_took:?}");
    // Freed memory may take a moment to go back to the system.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = rss_mb(child.id());
    while after >= before + 100.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = rss_mb(child.id());
    }
    assert!(after < before + 100.0, "RSS went from {before:.0} MB to {after:.0} MB");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

#[test]
fn prompts_over_the_byte_limit_get_422_naming_the_flag_on_every_route() {
    let mut options = test_options();
    options.max_input_bytes = Some(1000);
    let server = TestServer::start(options);
    let prompt = prose(1001);
    let cases = [
        ("/generate", json!({"inputs": prompt})),
        ("/generate_stream", json!({"inputs": prompt})),
        ("/", json!({"inputs": prompt})),
        ("/tokenize", json!({"inputs": prompt})),
        ("/v1/completions", json!({"model": "m", "prompt": prompt})),
        ("/v1/completions", json!({"model": "m", "prompt": prompt, "stream": true})),
        ("/v1/chat/completions", json!({"model": "m", "messages": [{"role": "user", "content": prompt}]})),
    ];
    for (path, body) in cases {
        let message = post_json(server.addr, path, &body).expect_error(422, "validation");
        assert!(message.contains("1000") && message.contains("--max-input-bytes"), "{path}: {message}");
    }
    // At the limit it goes through.
    let at_limit = post_json(server.addr, "/tokenize", &json!({"inputs": prose(1000)}));
    assert_eq!(at_limit.status, 200, "{}", at_limit.text());
    assert_eq!(server.metric("vicuna_requests_rejected_total{reason=\"validation\"}"), 7.0);
}

/// The default byte limit is `--max-input-tokens` times the longest token (27 bytes for LLaMA's
/// vocabulary), so a prompt of the longest tokens that fits in tokens is never refused by bytes.
#[test]
fn the_default_byte_limit_never_refuses_a_prompt_that_fits_in_tokens() {
    let server = TestServer::with_defaults();
    let info = get(server.addr, "/info").json();
    assert_eq!(info["max_input_bytes"], 2047 * 27, "{info}");
    // "▁административ" is one token of 27 bytes (with the space SentencePiece's mark stands for).
    let prompt = format!("административ{}", " административ".repeat(2045));
    assert!(prompt.len() > 2047 * 16, "a fixed 16 bytes a token would refuse it");
    let tokens = post_json(server.addr, "/tokenize", &json!({"inputs": prompt})).json();
    assert_eq!(tokens.as_array().unwrap().len(), 2047, "BOS and 2046 words of one token each");
    let response = post_json(server.addr, "/generate", &json!({"inputs": prompt, "parameters": {"max_new_tokens": 1}}));
    assert_eq!(response.status, 200, "{}", response.text());
    // One byte over the limit is refused by bytes, one token over by tokens.
    let limit = 2047 * 27;
    let message =
        post_json(server.addr, "/generate", &json!({"inputs": "a".repeat(limit + 1)})).expect_error(422, "validation");
    assert!(message.contains("--max-input-bytes"), "{message}");
    let message = post_json(server.addr, "/generate", &json!({"inputs": format!("{prompt} административ")}))
        .expect_error(422, "validation");
    assert!(message.contains("--max-input-tokens"), "{message}");
}

/// What a raw connection gets before the server closes it, and how long after `since` it was
/// closed; None if it is still open after `within`.
fn read_until_closed(stream: &mut TcpStream, since: Instant, within: Duration) -> Option<(Vec<u8>, Duration)> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Some((received, since.elapsed())),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            // A reset closes it too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some((received, since.elapsed())),
            Err(_) => return None,
        }
    }
}

#[test]
fn a_connection_that_does_not_finish_its_request_head_is_closed_after_the_timeout() {
    let mut options = test_options();
    options.header_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(options);
    let opened = Instant::now();
    // Half a request line, then nothing: closed after about a second (slowloris).
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(b"GET /hea").unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(server.addr).unwrap();
    // A head sent slowly, a byte every 100 ms: the timeout is on the whole head, not per byte.
    let mut dripping = TcpStream::connect(server.addr).unwrap();
    let drip = std::thread::spawn(move || {
        for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" {
            if dripping.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        read_until_closed(&mut dripping, opened, Duration::from_secs(10))
    });
    for stream in [&mut half, &mut silent] {
        let (received, after) =
            read_until_closed(stream, opened, Duration::from_secs(10)).expect("closed by the server");
        assert!(after >= Duration::from_millis(800) && after < Duration::from_secs(5), "closed after {after:?}");
        let text = String::from_utf8_lossy(&received);
        assert!(!text.contains("200 OK"), "{text}");
    }
    let (received, after) = drip.join().unwrap().expect("the dripping connection is closed");
    // Writes fail once the server has closed it; at worst the client writes all 4 s of its head.
    assert!(after < Duration::from_secs(8), "closed after {after:?}");
    assert!(!String::from_utf8_lossy(&received).contains("200 OK"), "a 4 s head is over the 1 s timeout");
    // A head that takes less than the timeout is answered.
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    slow.write_all(b"st: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let (received, _) =
        read_until_closed(&mut slow, Instant::now(), Duration::from_secs(10)).expect("answered and closed");
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&received));
    // A long generation is not cut: the timeout is on the head only.
    let mut stream = EventStream::open(
        server.addr,
        "/generate_stream",
        &json!({"inputs": "Hi", "parameters": {"max_new_tokens": 40, "do_sample": true, "seed": 1}}),
    );
    let events: Vec<Value> = std::iter::from_fn(|| stream.next_json()).collect();
    assert!(events.last().unwrap()["generated_text"].is_string());
}

const ORIGIN: &str = "https://app.example.com";

fn preflight(addr: SocketAddr, path: &str, origin: &str) -> common::Response {
    request(
        addr,
        "OPTIONS",
        path,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization, content-type"),
        ],
        b"",
    )
}

#[test]
fn cors_preflights_are_answered_without_the_key_and_responses_name_the_origin() {
    let mut options = test_options();
    options.cors_allow_origins = vec![ORIGIN.into(), "http://localhost:5173".into()];
    options.api_key = Some("sekret".into());
    let server = TestServer::start(options);
    for path in ["/v1/chat/completions", "/v1/completions", "/generate", "/v1/models"] {
        let answer = preflight(server.addr, path, ORIGIN);
        assert_eq!(answer.status, 204, "{path}: {}", answer.text());
        assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(answer.header("access-control-allow-methods"), Some("GET, POST, OPTIONS"));
        let headers = answer.header("access-control-allow-headers").unwrap().to_lowercase();
        assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
        assert!(answer.body.is_empty());
    }
    // The request itself still needs the key; its refusal is readable by the page.
    let body = json!({"model": "m", "prompt": "Hi", "max_tokens": 2}).to_string();
    let refused = request(
        server.addr,
        "POST",
        "/v1/completions",
        &[("Origin", ORIGIN), ("Content-Type", "application/json")],
        body.as_bytes(),
    );
    refused.expect_error(401, "unauthorized");
    assert_eq!(refused.header("access-control-allow-origin"), Some(ORIGIN));
    let answered = request(
        server.addr,
        "POST",
        "/v1/completions",
        &[("Origin", ORIGIN), ("Content-Type", "application/json"), ("Authorization", "Bearer sekret")],
        body.as_bytes(),
    );
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert_eq!(answered.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(answered.header("vary").is_some_and(|v| v.to_lowercase().contains("origin")));
    // A second listed origin is named back too; an unlisted one gets no CORS headers.
    let other = preflight(server.addr, "/v1/models", "http://localhost:5173");
    assert_eq!(other.header("access-control-allow-origin"), Some("http://localhost:5173"));
    for answer in [preflight(server.addr, "/v1/models", "https://evil.example"), {
        request(server.addr, "GET", "/health", &[("Origin", "https://evil.example")], b"")
    }] {
        assert!(
            answer.headers.iter().all(|(name, _)| !name.to_lowercase().starts_with("access-control-")),
            "{:?}",
            answer.headers
        );
    }
    // An OPTIONS that is not a preflight is not a CORS matter: the route does not take it.
    request(server.addr, "OPTIONS", "/v1/models", &[("Authorization", "Bearer sekret")], b"")
        .expect_error(405, "method_not_allowed");
}

#[test]
fn cors_with_a_star_allows_any_origin() {
    let mut options = test_options();
    options.cors_allow_origins = vec!["*".into()];
    let server = TestServer::start(options);
    let answer = preflight(server.addr, "/v1/chat/completions", "https://anywhere.example");
    assert_eq!(answer.status, 204);
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    let health = request(server.addr, "GET", "/health", &[("Origin", "https://anywhere.example")], b"");
    assert_eq!(health.header("access-control-allow-origin"), Some("*"));
}

#[test]
fn without_the_flag_there_are_no_cors_headers() {
    let server = TestServer::with_defaults();
    let answers = [
        preflight(server.addr, "/v1/chat/completions", ORIGIN),
        request(server.addr, "GET", "/v1/models", &[("Origin", ORIGIN)], b""),
    ];
    assert_eq!(answers[0].status, 405, "no preflight answers: {}", answers[0].text());
    assert_eq!(answers[1].status, 200);
    for answer in answers {
        assert!(
            answer.headers.iter().all(|(name, _)| !name.to_lowercase().starts_with("access-control-")),
            "{:?}",
            answer.headers
        );
    }
}

#[test]
fn head_answers_like_get_without_a_body() {
    for api_key in [None, Some("sekret")] {
        let mut options = test_options();
        options.api_key = api_key.map(String::from);
        let server = TestServer::start(options);
        let auth = [("Authorization", "Bearer sekret")];
        for path in ["/", "/health", "/info", "/metrics", "/v1/models"] {
            // With a key, the page and /health stay open to HEAD as to GET.
            let headers: &[(&str, &str)] =
                if api_key.is_some() && !matches!(path, "/" | "/health") { &auth } else { &[] };
            let got = request(server.addr, "GET", path, headers, b"");
            let head = request(server.addr, "HEAD", path, headers, b"");
            assert_eq!(got.status, 200, "GET {path}");
            assert_eq!(head.status, 200, "HEAD {path}: {}", head.text());
            assert!(head.body.is_empty(), "HEAD {path} has a body");
            assert_eq!(head.header("content-type"), got.header("content-type"), "HEAD {path}");
        }
        if api_key.is_some() {
            // Elsewhere HEAD needs the key as GET does.
            let refused = request(server.addr, "HEAD", "/info", &[], b"");
            assert_eq!(refused.status, 401);
            assert!(refused.body.is_empty());
        }
    }
}

/// `vicuna serve --shutdown-grace 0`, SIGTERM while OpenAI streams run: each ends with the error
/// and then `data: [DONE]`, as OpenAI's clients wait for.
#[test]
fn openai_streams_cut_short_by_shutdown_still_end_with_done() {
    let (mut child, addr) = start_server(&["--shutdown-grace", "0"]);
    let long = json!({"max_tokens": 1500, "ignore_eos": true, "temperature": 0.8, "seed": 3, "stream": true});
    let mut completion = long.clone();
    completion["prompt"] = json!("Once upon a time");
    let mut chat = long;
    chat["messages"] = json!([{"role": "user", "content": "Tell me a long story."}]);
    let mut streams = [
        EventStream::open(addr, "/v1/completions", &completion),
        EventStream::open(addr, "/v1/chat/completions", &chat),
    ];
    for stream in &mut streams {
        assert_eq!(stream.status, 200);
        assert!(stream.next_json().is_some());
    }
    sigterm(&child);
    for mut stream in streams {
        let data = stream.collect_data();
        let (done, rest) = data.split_last().expect("events after SIGTERM");
        assert_eq!(done, "[DONE]", "{data:?}");
        let error: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
        assert_eq!(error["error_type"], "unavailable", "{error}");
        assert!(error["error"].as_str().unwrap().contains("shutting down"), "{error}");
    }
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
}
