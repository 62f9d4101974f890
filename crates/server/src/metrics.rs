//! Counters, gauges and histograms in Prometheus' text format, kept with atomics (and a lock per
//! histogram) so the scheduler thread and the HTTP tasks update them without coordination.
//!
//! Besides our own `vicuna_*` metrics, the scheduler gauges that gateways route on are also
//! rendered under vLLM's names (the Gateway API Inference Extension's model-server protocol, which
//! llm-d and KServe follow, names vLLM's): `vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc` and `vllm:lora_requests_info`. They are read from the same atomics
//! as `vicuna_queue_size`, `vicuna_batch_size` and `vicuna_kv_cache_blocks_{in_use,total}`: one
//! source, two names.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vicuna_model::native::PrefixStats;

/// Why a request was turned away before it reached the queue.
#[derive(Clone, Copy, Debug)]
pub enum Rejection {
    Validation,
    Overloaded,
    Unauthorized,
    Unavailable,
}

/// How a queued request ended (the first three are `FinishReason`s).
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Length,
    EosToken,
    StopSequence,
    Cancelled,
    Failed,
}

impl From<vicuna_engine::FinishReason> for Outcome {
    fn from(reason: vicuna_engine::FinishReason) -> Self {
        match reason {
            vicuna_engine::FinishReason::Length => Outcome::Length,
            vicuna_engine::FinishReason::EosToken => Outcome::EosToken,
            vicuna_engine::FinishReason::StopSequence => Outcome::StopSequence,
        }
    }
}

const REJECTION_LABELS: [&str; 4] = ["validation", "overloaded", "unauthorized", "unavailable"];
const OUTCOME_LABELS: [&str; 5] = ["length", "eos_token", "stop_sequence", "cancelled", "error"];

/// Latency buckets from 1 ms to 60 s, in seconds.
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

#[derive(Default)]
pub struct Metrics {
    /// The served model's name, the `model_name` label of the vLLM-named gauges.
    model_name: String,
    requests_queued: AtomicU64,
    rejected: [AtomicU64; 4],
    finished: [AtomicU64; 5],
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    queue_size: AtomicU64,
    batch_size: AtomicU64,
    kv_blocks_in_use: AtomicU64,
    kv_blocks_total: AtomicU64,
    kv_block_tokens: AtomicU64,
    prefix_lookups: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prefix_blocks: AtomicU64,
    prefix_evictions: AtomicU64,
    drafted_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    /// `--max-loras`, vLLM's `max_lora` label.
    max_loras: usize,
    /// Requests running and waiting per adapter (adapters with none are left out).
    lora_requests: Mutex<BTreeMap<String, [usize; 2]>>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    step_duration: Histogram,
}

#[derive(Default)]
struct Histogram {
    inner: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    /// Per bucket (not cumulative); one more than `LATENCY_BUCKETS` for +Inf.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let mut data = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = LATENCY_BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS.len());
        data.counts[bucket] += 1;
        data.sum += seconds;
        data.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let data = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&data.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", data.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", data.sum, data.count);
    }
}

fn set(gauge: &AtomicU64, value: usize) {
    gauge.store(value as u64, Ordering::Relaxed);
}

/// A label value in the text format: backslash, double quote and line feed escaped.
fn label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Metrics of a server whose model the API calls `model_name`, running at most `max_loras` adapters at once.
    pub fn new(model_name: &str, max_loras: usize) -> Metrics {
        Metrics { model_name: model_name.to_string(), max_loras, ..Metrics::default() }
    }

    /// The adapters of the running requests and of the waiting ones, a name once per request.
    pub fn lora_state(&self, running: &[&str], waiting: &[&str]) {
        let mut counts: BTreeMap<String, [usize; 2]> = BTreeMap::new();
        for (state, names) in [running, waiting].iter().enumerate() {
            for name in names.iter() {
                counts.entry(name.to_string()).or_default()[state] += 1;
            }
        }
        *self.lora_requests.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn queued(&self, prompt_tokens: usize) {
        self.requests_queued.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }

    pub fn finished(&self, outcome: Outcome) {
        self.finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_generated(&self, since_previous: Option<Duration>, since_arrival: Option<Duration>) {
        self.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = since_previous {
            self.inter_token_latency.observe(d.as_secs_f64());
        }
        if let Some(d) = since_arrival {
            self.time_to_first_token.observe(d.as_secs_f64());
        }
    }

    pub fn step(&self, duration: Duration) {
        self.step_duration.observe(duration.as_secs_f64());
    }

    /// The scheduler's state after a step or a change of its queue.
    pub fn scheduler_state(&self, queue_size: usize, batch_size: usize, kv_blocks_in_use: usize) {
        set(&self.queue_size, queue_size);
        set(&self.batch_size, batch_size);
        set(&self.kv_blocks_in_use, kv_blocks_in_use);
    }

    /// A request was admitted after looking up the prefix cache.
    pub fn prefix_lookup(&self) {
        self.prefix_lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Prompt positions a request took from the prefix cache instead of computing them.
    pub fn prefix_hit_tokens(&self, tokens: usize) {
        self.prefix_hit_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// A step checked `drafted` guessed tokens of one sequence and kept `accepted`.
    pub fn speculated(&self, drafted: usize, accepted: usize) {
        self.drafted_tokens.fetch_add(drafted as u64, Ordering::Relaxed);
        self.accepted_tokens.fetch_add(accepted as u64, Ordering::Relaxed);
    }

    pub fn prefix_cache_state(&self, blocks: usize, stats: PrefixStats) {
        set(&self.prefix_blocks, blocks);
        self.prefix_evictions.store(stats.evictions, Ordering::Relaxed);
    }

    pub fn kv_capacity(&self, blocks: usize, block_tokens: usize) {
        set(&self.kv_blocks_total, blocks);
        set(&self.kv_block_tokens, block_tokens);
    }

    pub fn kv_blocks_in_use(&self) -> u64 {
        self.kv_blocks_in_use.load(Ordering::Relaxed)
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut scalar = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        scalar("vicuna_requests_total", "counter", "Requests accepted into the queue.", get(&self.requests_queued));
        scalar("vicuna_queue_size", "gauge", "Requests waiting for a place in the batch.", get(&self.queue_size));
        scalar("vicuna_batch_size", "gauge", "Requests in the running batch.", get(&self.batch_size));
        scalar(
            "vicuna_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            get(&self.prompt_tokens),
        );
        scalar("vicuna_generated_tokens_total", "counter", "Tokens generated.", get(&self.generated_tokens));
        scalar(
            "vicuna_kv_cache_blocks_in_use",
            "gauge",
            "KV-cache blocks reserved by running requests.",
            get(&self.kv_blocks_in_use),
        );
        scalar("vicuna_kv_cache_blocks_total", "gauge", "KV-cache blocks in the budget.", get(&self.kv_blocks_total));
        scalar(
            "vicuna_prefix_cache_lookups_total",
            "counter",
            "Requests admitted after a prefix-cache lookup.",
            get(&self.prefix_lookups),
        );
        scalar(
            "vicuna_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens read from the prefix cache instead of computed.",
            get(&self.prefix_hit_tokens),
        );
        scalar(
            "vicuna_prefix_cache_blocks",
            "gauge",
            "KV-cache blocks the prefix cache keeps (shared with running requests or idle).",
            get(&self.prefix_blocks),
        );
        scalar(
            "vicuna_prefix_cache_evictions_total",
            "counter",
            "Cached blocks dropped to make room.",
            get(&self.prefix_evictions),
        );
        scalar(
            "vicuna_speculative_drafted_tokens_total",
            "counter",
            "Guessed tokens checked by the model (speculative decoding).",
            get(&self.drafted_tokens),
        );
        scalar(
            "vicuna_speculative_accepted_tokens_total",
            "counter",
            "Guessed tokens the model kept (speculative decoding).",
            get(&self.accepted_tokens),
        );
        scalar(
            "vicuna_kv_cache_block_tokens",
            "gauge",
            "Token positions per KV-cache block.",
            get(&self.kv_block_tokens),
        );
        let _ = writeln!(
            out,
            "# HELP vicuna_requests_rejected_total Requests refused before queueing.\n\
             # TYPE vicuna_requests_rejected_total counter"
        );
        for (label, value) in REJECTION_LABELS.iter().zip(&self.rejected) {
            let _ = writeln!(out, "vicuna_requests_rejected_total{{reason=\"{label}\"}} {}", get(value));
        }
        let _ = writeln!(
            out,
            "# HELP vicuna_requests_finished_total Queued requests that ended, by how.\n\
             # TYPE vicuna_requests_finished_total counter"
        );
        for (label, value) in OUTCOME_LABELS.iter().zip(&self.finished) {
            let _ = writeln!(out, "vicuna_requests_finished_total{{reason=\"{label}\"}} {}", get(value));
        }
        self.time_to_first_token.render(
            &mut out,
            "vicuna_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "vicuna_inter_token_latency_seconds",
            "Between consecutive tokens of one request.",
        );
        self.step_duration.render(&mut out, "vicuna_batch_step_seconds", "One forward pass of the running batch.");
        self.render_vllm(&mut out);
        out
    }

    /// The gauges of vLLM's that gateways scrape, with vLLM's names, types and meanings (see the
    /// module's documentation); the first three carry `model_name` as vLLM's do.
    fn render_vllm(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let model = label_value(&self.model_name);
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {value:?}");
        };
        gauge(
            "vllm:num_requests_running",
            "Requests in the running batch (the same as vicuna_batch_size).",
            get(&self.batch_size) as f64,
        );
        gauge(
            "vllm:num_requests_waiting",
            "Requests queued, not yet in the running batch (the same as vicuna_queue_size).",
            get(&self.queue_size) as f64,
        );
        // vLLM's "perc" is a fraction: 1 is a full cache. Blocks the prefix cache keeps but no
        // running request holds count as free, as in vLLM (they are evicted when room is needed).
        let total = get(&self.kv_blocks_total);
        let usage = if total == 0 { 0.0 } else { get(&self.kv_blocks_in_use) as f64 / total as f64 };
        gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use, 0 to 1 (vicuna_kv_cache_blocks_in_use / vicuna_kv_cache_blocks_total).",
            usage,
        );
        // vLLM's value is the time the adapter lists were last updated, so a scraper takes the
        // newest series. The lists name the adapters with requests running / waiting, comma-separated.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let counts = self.lora_requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let list = |state: usize| {
            let names: Vec<&str> = counts.iter().filter(|(_, c)| c[state] > 0).map(|(n, _)| n.as_str()).collect();
            label_value(&names.join(","))
        };
        let (running, waiting, max_lora) = (list(0), list(1), self.max_loras);
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on LoRA requests.\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{running}\",\
             waiting_lora_adapters=\"{waiting}\"}} {now:?}"
        );
        for (state, name) in [(0, "running"), (1, "waiting")] {
            let _ = writeln!(
                out,
                "# HELP vicuna_lora_requests_{name} Requests {name} per LoRA adapter.\n\
                 # TYPE vicuna_lora_requests_{name} gauge"
            );
            for (adapter, c) in counts.iter().filter(|(_, c)| c[state] > 0) {
                let _ =
                    writeln!(out, "vicuna_lora_requests_{name}{{adapter=\"{}\"}} {}", label_value(adapter), c[state]);
            }
        }
    }
}
