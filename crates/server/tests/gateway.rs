//! Beyond one machine: what a gateway in front of several replicas needs from each.
//!
//! - `/metrics` carries the gauges the Gateway API Inference Extension's endpoint picker (and
//!   llm-d, KServe) route on, under vLLM's names, and they follow the scheduler (in this process);
//! - two `vicuna serve` replicas behind a real HAProxy, under a steady load of streaming clients:
//!   one gets SIGTERM mid-run, drains (its `/health` goes 503, HAProxy's check takes it out, its
//!   streams finish) and is started again, with no failed request. HAProxy comes from Debian
//!   (`apt-get install haproxy`); without it the test skips and says so, unless
//!   VICUNA_REQUIRE_REAL_CLIENTS=1 (then it fails);
//! - the Dockerfile and the Kubernetes manifests in deploy/ parse, and agree with the binary's
//!   own flags (`vicuna serve --help`): port, probes, drain and grace period.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::binary::{path, sigterm, vicuna_binary, wait_exit};
use common::{get, model_dir, repo_root, skip_or_fail, test_options, tokenizer_file, EventStream, TestServer};
use serde_json::{json, Value};
use serde_yaml_ng::Value as Yaml;
use vicuna_model::BLOCK_TOKENS;
use vicuna_server::scheduler::blocks_needed;

// ---------------------------------------------------------------------------------------------
// vLLM-named metrics
// ---------------------------------------------------------------------------------------------

/// One scrape of `/metrics`: every sample line, by its name with labels as written
/// (`vllm:num_requests_waiting{model_name="m"}`).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200);
    let text = response.text();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        assert!(samples.insert(name.to_string(), value).is_none(), "{name} twice in:\n{text}");
    }
    samples
}

fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no {name} in {:?}", samples.keys().collect::<Vec<_>>()))
}

const WAITING: &str = "vllm:num_requests_waiting{model_name=\"tiny-v32001\"}";
const RUNNING: &str = "vllm:num_requests_running{model_name=\"tiny-v32001\"}";
const KV_USAGE: &str = "vllm:kv_cache_usage_perc{model_name=\"tiny-v32001\"}";
const LORA: &str = "vllm:lora_requests_info{max_lora=\"16\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}";

/// The vLLM gauges must say what our own say, from the same scrape.
fn assert_consistent(samples: &HashMap<String, f64>) {
    assert_eq!(sample(samples, WAITING), sample(samples, "vicuna_queue_size"));
    assert_eq!(sample(samples, RUNNING), sample(samples, "vicuna_batch_size"));
    let usage = sample(samples, "vicuna_kv_cache_blocks_in_use") / sample(samples, "vicuna_kv_cache_blocks_total");
    assert!((sample(samples, KV_USAGE) - usage).abs() < 1e-12, "{} vs {usage}", sample(samples, KV_USAGE));
}

#[test]
fn vllm_gauges_follow_the_queue_the_batch_and_the_kv_cache() {
    let mut options = test_options();
    options.max_batch_size = Some(1);
    options.max_batch_total_tokens = Some(2048);
    let server = TestServer::start(options);
    let kv_blocks = 2048 / BLOCK_TOKENS;

    let idle = scrape(server.addr);
    assert_consistent(&idle);
    assert_eq!((sample(&idle, WAITING), sample(&idle, RUNNING), sample(&idle, KV_USAGE)), (0.0, 0.0, 0.0));
    assert_eq!(sample(&idle, "vicuna_kv_cache_blocks_total"), kv_blocks as f64);
    // The LoRA info's value is the time of the scrape, as vLLM's (the endpoint picker takes the newest).
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((sample(&idle, LORA) - now).abs() < 60.0, "lora_requests_info {} at {now}", sample(&idle, LORA));
    let text = get(server.addr, "/metrics").text();
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    ] {
        assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{name} is not a gauge:\n{text}");
    }

    // One long request runs (the batch holds one); two more wait behind it.
    let long_tokens = 2000;
    let prompt = "Hi";
    let prompt_ids = common::load_tokenizer().encode(prompt, true).len();
    let stream = |max_new_tokens: usize| {
        let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": true}});
        EventStream::open(server.addr, "/generate_stream", &body)
    };
    let mut running = stream(long_tokens);
    assert!(running.next_json().is_some(), "the long request started");
    let waiting = [stream(8), stream(8)];
    let deadline = Instant::now() + Duration::from_secs(10);
    let loaded = loop {
        let samples = scrape(server.addr);
        if sample(&samples, WAITING) == 2.0 {
            break samples;
        }
        assert!(Instant::now() < deadline, "never saw 2 waiting: {samples:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_consistent(&loaded);
    assert_eq!(sample(&loaded, RUNNING), 1.0);
    // The running request reserved its prompt plus max_new_tokens; the waiting ones nothing yet.
    let reserved = blocks_needed(prompt_ids, long_tokens, 1, 0);
    assert_eq!(sample(&loaded, KV_USAGE), reserved as f64 / kv_blocks as f64);
    assert!(sample(&loaded, KV_USAGE) > 0.9 && sample(&loaded, KV_USAGE) <= 1.0);

    // Clients gone: the gauges come back to zero (blocks kept by the prefix cache that no request
    // holds count as free, as in vLLM).
    // (Enough of it generated for full blocks in the prefix cache.)
    for _ in 0..32 {
        running.next_json();
    }
    drop(running);
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(server.addr);
        assert_consistent(&samples);
        let gauges = (sample(&samples, WAITING), sample(&samples, RUNNING), sample(&samples, KV_USAGE));
        if gauges == (0.0, 0.0, 0.0) {
            assert!(sample(&samples, "vicuna_prefix_cache_blocks") > 0.0, "the prefix cache kept blocks");
            break;
        }
        assert!(Instant::now() < deadline, "gauges stayed at {gauges:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn model_name_label_values_are_escaped() {
    let mut options = test_options();
    options.model_id = "a \"quoted\" \\ name".into();
    let server = TestServer::start(options);
    let samples = scrape(server.addr);
    assert!(
        samples.contains_key("vllm:num_requests_waiting{model_name=\"a \\\"quoted\\\" \\\\ name\"}"),
        "{samples:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Two replicas behind HAProxy
// ---------------------------------------------------------------------------------------------

/// A free loopback port (bound and released: another program binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `vicuna serve` on 127.0.0.1:`port`, its stderr in `log`; returns once it listens.
fn start_replica(port: u16, log: &Path) -> Child {
    let mut child = Command::new(vicuna_binary())
        .args(["serve", "--model", path(&model_dir()), "--tokenizer", path(&tokenizer_file())])
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--shutdown-grace", "30"])
        .stdout(Stdio::piped())
        .stderr(File::create(log).unwrap())
        .spawn()
        .expect("start vicuna serve");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(
        line.trim(),
        format!("listening on http://127.0.0.1:{port}"),
        "{}",
        std::fs::read_to_string(log).unwrap()
    );
    child
}

/// Kills a child left running when a test fails.
struct Reap(Vec<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// HAProxy's view of one server: (status, last check's status), from the stats page's CSV.
fn haproxy_server(stats: SocketAddr, server: &str) -> (String, String) {
    let csv = get(stats, "/stats;csv").text();
    let header: Vec<&str> = csv.lines().next().unwrap().trim_start_matches("# ").split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name} in {csv}"));
    let (status, check) = (column("status"), column("check_status"));
    csv.lines()
        .map(|line| line.split(',').collect::<Vec<_>>())
        .find(|fields| fields[0] == "replicas" && fields[1] == server)
        .map(|fields| (fields[status].to_string(), fields[check].to_string()))
        .unwrap_or_else(|| panic!("no server {server} in {csv}"))
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One streamed request through the balancer, read to its end: Ok if it completed, else why not.
/// Alternates between TGI's stream and OpenAI's chat stream.
fn streamed_request(addr: SocketAddr, i: usize) -> Result<(), String> {
    let seed = i as u64;
    if i.is_multiple_of(2) {
        let body = json!({"inputs": "### Human: Hi\n### Assistant:", "parameters": {
            "do_sample": true, "seed": seed, "max_new_tokens": 48, "ignore_eos": true, "details": true}});
        let mut stream = EventStream::open(addr, "/generate_stream", &body);
        if stream.status != 200 {
            return Err(format!("TGI stream: status {}", stream.status));
        }
        let last = std::iter::from_fn(|| stream.next_json()).last().ok_or("TGI stream: no events")?;
        if last.get("error").is_some() || last["details"]["generated_tokens"] != 48 {
            return Err(format!("TGI stream ended with {last}"));
        }
    } else {
        let body = json!({"model": "m", "stream": true, "max_tokens": 48, "ignore_eos": true, "seed": seed,
            "messages": [{"role": "user", "content": "Hi"}]});
        let mut stream = EventStream::open(addr, "/v1/chat/completions", &body);
        if stream.status != 200 {
            return Err(format!("chat stream: status {}", stream.status));
        }
        let events = stream.collect_data();
        if events.last().map(String::as_str) != Some("[DONE]") || events.iter().any(|e| e.contains("\"error\"")) {
            return Err(format!("chat stream ended with {:?}", events.iter().rev().take(2).collect::<Vec<_>>()));
        }
        let finish = events
            .iter()
            .rev()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find_map(|e| e["choices"][0]["finish_reason"].as_str().map(str::to_string));
        // 48 tokens, or the chat template's stop (`###`) if the random model writes it first.
        if !matches!(finish.as_deref(), Some("length" | "stop")) {
            return Err(format!("chat stream finished with {finish:?}"));
        }
    }
    Ok(())
}

/// Requests handled by a replica since it started (`vicuna_requests_total`).
fn requests_total(replica: SocketAddr) -> f64 {
    sample(&scrape(replica), "vicuna_requests_total")
}

#[test]
fn two_replicas_behind_haproxy_one_drained_and_restarted_under_load_fail_no_request() {
    // $HAPROXY, else Debian's (in /usr/sbin, which a non-root PATH may lack), else one on PATH.
    let runs = |program: &str| Command::new(program).arg("-v").output().is_ok_and(|o| o.status.success());
    let haproxy = match std::env::var("HAPROXY") {
        Ok(program) => program,
        Err(_) => ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|p| runs(p)).unwrap_or("haproxy").to_string(),
    };
    if !runs(&haproxy) {
        return skip_or_fail(&format!("HAProxy does not run as {haproxy:?} (apt-get install haproxy, or set HAPROXY)"));
    }
    let began = Instant::now();
    let dir = std::env::temp_dir().join(format!("vicuna-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = [free_port(), free_port()];
    let replica = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let log = |name: &str| dir.join(format!("{name}.log"));
    let mut children = Reap(vec![start_replica(ports[0], &log("r0")), start_replica(ports[1], &log("r1-first"))]);

    // The balancer: least connections (streams are long), a health check on /health every
    // 100 ms that takes a server out at its first failure, and a request refused by a draining
    // replica (503 before it was queued) or a connection it closed tried again on the other.
    // `option http-buffer-request` makes those retries possible: HAProxy can replay only a request
    // it holds whole, and without it a body sent after the headers is already on its way.
    let (front, stats) = (free_port(), free_port());
    let config = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 retries 3\n  option redispatch 1\n  retry-on conn-failure empty-response 503\n  option http-buffer-request\n\
         frontend api\n  bind 127.0.0.1:{front}\n  default_backend replicas\n\
         backend replicas\n  balance leastconn\n  option httpchk GET /health\n  http-check expect status 200\n\
         \x20 default-server check inter 100ms fall 1 rise 1\n\
         \x20 server r0 127.0.0.1:{}\n  server r1 127.0.0.1:{}\n\
         listen stats\n  bind 127.0.0.1:{stats}\n  stats enable\n  stats uri /stats\n",
        ports[0], ports[1]
    );
    let config_file = dir.join("haproxy.cfg");
    std::fs::write(&config_file, &config).unwrap();
    let check = Command::new(&haproxy).arg("-c").arg("-f").arg(&config_file).output().unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    children.0.push(
        Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&config_file)
            .stdout(File::create(log("haproxy")).unwrap())
            .stderr(File::create(log("haproxy.err")).unwrap())
            .spawn()
            .expect("start haproxy"),
    );
    let (front, stats) = (SocketAddr::from(([127, 0, 0, 1], front)), SocketAddr::from(([127, 0, 0, 1], stats)));
    wait_until("haproxy listening", Duration::from_secs(10), || {
        TcpStream::connect(front).is_ok() && TcpStream::connect(stats).is_ok()
    });
    wait_until("both replicas UP in haproxy", Duration::from_secs(10), || {
        haproxy_server(stats, "r0").0 == "UP" && haproxy_server(stats, "r1").0 == "UP"
    });

    // The load: 4 clients, each streaming one request after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (stop, done, failures, slowest) = (stop.clone(), done.clone(), failures.clone(), slowest.clone());
            std::thread::spawn(move || {
                let mut i = client;
                // Bounded however the test goes: at most 2,000 requests a client.
                while !stop.load(Ordering::SeqCst) && i < 8000 {
                    let start = Instant::now();
                    match streamed_request(front, i) {
                        Ok(()) => done.fetch_add(1, Ordering::SeqCst),
                        Err(why) => {
                            failures.lock().unwrap().push(why);
                            0
                        }
                    };
                    let took = start.elapsed();
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(took);
                    i += 4;
                }
            })
        })
        .collect();

    // Both replicas serve before anything happens.
    wait_until("both replicas get requests", Duration::from_secs(30), || {
        requests_total(replica(0)) >= 3.0 && requests_total(replica(1)) >= 3.0
    });

    // SIGTERM to r1 while it streams: a long request sent to it directly keeps its drain going
    // for a while, so HAProxy's check sees /health answer 503 (L7STS), not a closed port.
    // (Its first event is read here, so it runs before the signal; the rest in a thread.)
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 400, "ignore_eos": true, "details": true}});
    let mut long_stream = EventStream::open(replica(1), "/generate_stream", &body);
    let first = long_stream.next_json();
    let long = std::thread::spawn(move || std::iter::from_fn(|| long_stream.next_json()).last());
    wait_until("r1 runs requests", Duration::from_secs(10), || {
        sample(&scrape(replica(1)), "vllm:num_requests_running{model_name=\"safetensors-f16\"}") >= 2.0
    });
    let drained_at = Instant::now();
    sigterm(&children.0[1]);
    let mut seen_down = None;
    wait_until("haproxy takes r1 out", Duration::from_secs(10), || {
        let (status, check) = haproxy_server(stats, "r1");
        let exited = children.0[1].try_wait().unwrap().is_some();
        if status.starts_with("DOWN") {
            seen_down = Some((check, exited));
        }
        seen_down.is_some()
    });
    let (check, exited) = seen_down.unwrap();
    assert_eq!(check, "L7STS", "r1 was taken out by its /health answer (503), not a refused connection");
    assert!(!exited, "r1 was still draining when haproxy took it out");
    let last = long.join().unwrap();
    assert!(first.is_some(), "the long stream started before SIGTERM");
    let last = last.expect("the long stream's last event");
    assert_eq!(last["details"]["generated_tokens"], 400, "the stream running at SIGTERM finished: {last}");
    let status = wait_exit(&mut children.0[1], Duration::from_secs(40));
    assert!(status.success(), "r1 exit status {status}: {}", std::fs::read_to_string(log("r1-first")).unwrap());
    let drain = drained_at.elapsed();
    assert!(drain < Duration::from_secs(30), "the drain took {drain:?}, past --shutdown-grace");
    let during = done.load(Ordering::SeqCst);

    // r1 comes back on its port; HAProxy puts it back and it serves again.
    children.0[1] = start_replica(ports[1], &log("r1-second"));
    wait_until("haproxy puts r1 back", Duration::from_secs(10), || haproxy_server(stats, "r1").0 == "UP");
    wait_until("the restarted r1 gets requests", Duration::from_secs(30), || requests_total(replica(1)) >= 3.0);
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }

    let failures = failures.lock().unwrap();
    let total = done.load(Ordering::SeqCst);
    let slowest = *slowest.lock().unwrap();
    println!(
        "{total} requests ({during} by the end of the drain), drain {drain:?}, slowest request {slowest:?}, \
         {:?} in all",
        began.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total >= 20, "only {total} requests completed");
    assert!(slowest < Duration::from_secs(20), "a 48-token request took {slowest:?}");
    assert!(began.elapsed() < Duration::from_secs(120), "the whole run took {:?}", began.elapsed());
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// deploy/: Dockerfile and Kubernetes manifests
// ---------------------------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Every document of a multi-document YAML file, parsed.
fn yaml_documents(file: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let value: Yaml = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            value
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The `--long` flags `vicuna serve --help` lists, with their defaults where it shows one.
fn serve_flags() -> HashMap<String, Option<String>> {
    let output = Command::new(vicuna_binary()).args(["serve", "--help"]).output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let mut flags = HashMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        // A flag's line is indented less than the description lines under it (which may start
        // with another flag's name when wrapped).
        let flag_line = trimmed.starts_with('-') && line.len() - trimmed.len() <= 6;
        if let Some(at) = trimmed.find("--").filter(|_| flag_line) {
            let name: String =
                trimmed[at + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            flags.insert(name.clone(), None);
            current = Some(name);
        }
        if let (Some(name), Some(at)) = (&current, line.find("[default: ")) {
            let value = line[at + 10..].split(']').next().unwrap().to_string();
            flags.insert(name.clone(), Some(value));
        }
    }
    assert!(flags.contains_key("port") && flags.contains_key("shutdown-grace"), "unexpected --help:\n{help}");
    flags
}

/// `["--flag", "value", "--switch", ...]` as flag → value (None for a switch).
fn parse_args(args: &[String]) -> HashMap<String, Option<String>> {
    let mut parsed = HashMap::new();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].strip_prefix("--").unwrap_or_else(|| panic!("argument {:?} is not a --flag", args[i]));
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None if args.get(i + 1).is_some_and(|next| !next.starts_with("--")) => {
                i += 1;
                (flag.to_string(), Some(args[i].clone()))
            }
            None => (flag.to_string(), None),
        };
        assert!(parsed.insert(name.clone(), value).is_none(), "--{name} given twice");
        i += 1;
    }
    parsed
}

fn strings(value: &Yaml) -> Vec<String> {
    value.as_sequence().expect("a list").iter().map(|v| v.as_str().expect("a string").to_string()).collect()
}

fn int(value: &Yaml, what: &str) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("{what} is not a whole number: {value:?}"))
}

fn find<'a>(documents: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = documents.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "one {kind} in deploy/");
    found[0]
}

#[test]
fn dockerfile_and_kubernetes_manifests_match_the_binary() {
    let flags = serve_flags();
    let dir = deploy_dir();
    let mut documents = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_some_and(|e| e == "yaml") {
            documents.extend(yaml_documents(&file));
        }
    }
    for document in &documents {
        assert!(document["apiVersion"].is_string() && document["kind"].is_string(), "{document:?}");
        assert!(document["metadata"]["name"].is_string(), "{document:?}");
    }

    // The Deployment's container runs `vicuna serve` with flags the binary has.
    let deployment = find(&documents, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let mut command: Vec<String> = container.get("command").map(strings).unwrap_or_default();
    command.extend(strings(&container["args"]));
    assert_eq!(command[0], "serve", "the image's entrypoint is vicuna; args start with the subcommand: {command:?}");
    let args = parse_args(&command[1..]);
    for name in args.keys() {
        assert!(flags.contains_key(name), "--{name} is not a flag of vicuna serve");
    }
    assert_eq!(args["host"].as_deref(), Some("0.0.0.0"), "a pod must listen beyond loopback");
    assert!(args["model"].is_some());
    let port: u16 = args.get("port").cloned().flatten().or_else(|| flags["port"].clone()).unwrap().parse().unwrap();
    let grace: u64 = args
        .get("shutdown-grace")
        .cloned()
        .flatten()
        .or_else(|| flags["shutdown-grace"].clone())
        .unwrap()
        .parse()
        .unwrap();

    // The container port, the probes and the Service point at that port and at /health.
    let container_ports = container["ports"].as_sequence().unwrap();
    let named = container_ports.iter().find(|p| p["containerPort"].as_u64() == Some(port as u64));
    let port_name = named.unwrap_or_else(|| panic!("no containerPort {port}"))["name"].as_str().unwrap().to_string();
    let probe_port = |probe: &Yaml| {
        let target = &probe["httpGet"]["port"];
        target.as_u64() == Some(port as u64) || target.as_str() == Some(port_name.as_str())
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        let probe = &container[probe];
        assert_eq!(probe["httpGet"]["path"].as_str(), Some("/health"), "{probe:?}");
        assert!(probe_port(probe), "{probe:?} is not on port {port}");
    }
    // The liveness probe must not kill a replica that drains (its /health is 503 then).
    let liveness = &container["livenessProbe"];
    let tolerates =
        int(&liveness["periodSeconds"], "periodSeconds") * int(&liveness["failureThreshold"], "failureThreshold");
    assert!(tolerates > grace, "liveness gives up after {tolerates} s, before a {grace} s drain ends");

    // preStop waits for the endpoint to be removed, then SIGTERM drains for up to --shutdown-grace:
    // Kubernetes' grace period must cover both (it counts from the start of preStop).
    let pre_stop = strings(&container["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(pre_stop[0], "sleep", "{pre_stop:?}");
    let sleep: u64 = pre_stop[1].parse().unwrap();
    let termination = int(&pod["terminationGracePeriodSeconds"], "terminationGracePeriodSeconds");
    assert!(
        termination >= sleep + grace + 5,
        "terminationGracePeriodSeconds {termination} < preStop {sleep} + --shutdown-grace {grace} + 5"
    );
    assert!(termination <= sleep + grace + 60, "terminationGracePeriodSeconds {termination} is far past the drain");

    // The model comes from a volume mounted where --model points.
    let model = args["model"].clone().unwrap();
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount = mounts
        .iter()
        .find(|m| model.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("--model {model} is on no mounted volume"));
    let volume = mount["name"].as_str().unwrap();
    assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["name"].as_str() == Some(volume)));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    // The Service reaches that port on the Deployment's pods.
    let service = find(&documents, "Service");
    let labels = deployment["spec"]["template"]["metadata"]["labels"].as_mapping().unwrap();
    for (key, value) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(labels.get(key), Some(value), "the Service selects {key:?}: {value:?}, the pods do not carry it");
    }
    let service_port = &service["spec"]["ports"][0]["targetPort"];
    assert!(service_port.as_u64() == Some(port as u64) || service_port.as_str() == Some(port_name.as_str()));

    // The InferencePool takes the same pods, on that port.
    let pool = find(&documents, "InferencePool");
    assert_eq!(pool["apiVersion"].as_str(), Some("inference.networking.k8s.io/v1"));
    for (key, value) in pool["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            labels.get(key),
            Some(value),
            "the InferencePool selects {key:?}: {value:?}, the pods do not carry it"
        );
    }
    assert_eq!(int(&pool["spec"]["targetPorts"][0]["number"], "targetPorts"), port as u64);
    let route = find(&documents, "HTTPRoute");
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["name"], pool["metadata"]["name"]);

    // The HPA scales the Deployment on the waiting queue, a metric /metrics exports, through the
    // custom metrics API (prometheus-adapter's rule maps the name).
    let hpa = find(&documents, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"].as_str(), Some("autoscaling/v2"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"].as_str(), Some("Pods"));
    let hpa_metric = metric["pods"]["metric"]["name"].as_str().unwrap();
    let adapter = find(&documents, "ConfigMap");
    let rules: Yaml =
        serde_yaml_ng::from_str(adapter["data"]["config.yaml"].as_str().expect("the adapter's rules")).unwrap();
    let rule = rules["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["name"]["as"].as_str() == Some(hpa_metric))
        .unwrap_or_else(|| panic!("no prometheus-adapter rule exposes {hpa_metric}"));
    assert!(rule["seriesQuery"].as_str().unwrap().contains("vllm:num_requests_waiting"), "{rule:?}");
    let server = TestServer::with_defaults();
    let text = get(server.addr, "/metrics").text();
    assert!(text.contains("\nvllm:num_requests_waiting{"), "the HPA's metric is exported");

    // The Dockerfile: multi-stage, non-root, the vicuna binary as entrypoint, the same port.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(i, rest)| (i.to_uppercase(), rest.trim().to_string())))
        .collect();
    let all = |name: &str| instructions.iter().filter(|(i, _)| i == name).map(|(_, r)| r.as_str()).collect::<Vec<_>>();
    let stages = all("FROM");
    assert!(stages.len() >= 2, "a builder stage and a runtime stage: {stages:?}");
    assert!(
        stages[0].starts_with("rust:")
            && stages.last().unwrap().starts_with("debian:")
            && stages.last().unwrap().contains("slim")
    );
    assert_eq!(all("EXPOSE"), vec![port.to_string().as_str()], "EXPOSE the port the Deployment uses");
    let entrypoint: Vec<String> = serde_json::from_str(all("ENTRYPOINT").last().expect("an ENTRYPOINT")).unwrap();
    assert_eq!(entrypoint, vec!["/usr/local/bin/vicuna".to_string()]);
    let user = all("USER");
    assert!(user.last().is_some_and(|u| *u != "root" && *u != "0"), "runs as a non-root user: {user:?}");
    // The image's user is the one the pod runs as.
    let uid = user.last().unwrap().split(':').next().unwrap();
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64().map(|u| u.to_string()).as_deref(), Some(uid));
    let copies = all("COPY");
    assert!(copies.iter().any(|c| c.contains("--from=") && c.ends_with("/usr/local/bin/vicuna")), "{copies:?}");
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"), ".dockerignore leaves out target/");
}
