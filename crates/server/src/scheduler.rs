//! Continuous batching: one thread owns the model and runs the batch a step at a time.
//!
//! The HTTP side validates a request and hands a [`Job`] to [`Scheduler::submit`]; it lands in the
//! thread's inbox (a channel) and then:
//! - **queue**: jobs wait in arrival order;
//! - **batcher**: between two steps, waiting jobs join the batch in order while the batch has room
//!   (`max_batch_size`) and the KV budget has the blocks the job may need — its prompt plus
//!   `max_new_tokens`, less what the prefix cache already holds, reserved up front (a
//!   [`Reservation`]) so a running request never runs out; cached blocks no running request holds
//!   are evicted (least recently used first) to make room; what does not fit waits, and later
//!   arrivals do not overtake it;
//! - **prefix cache**: every full KV block a request computes (prompt and reply) is kept, keyed by
//!   the ids it holds, and shared read-only with later requests that start with the same ids — the
//!   next turn of a chat, requests with one system prompt. A request looks it up when admitted and
//!   again just before its first chunk (so requests admitted together still share what the first
//!   of them computes), and reads only the uncached rest of its prompt (at least one token);
//! - **infer**: one `forward_ragged` call reads one new token for every decoding sequence and the
//!   next chunk of every prefilling prompt (chunks of at most `max_prefill_tokens`, and no more than
//!   that many prompt tokens per step), so a long prompt never stalls the streams already running.
//!   Each sequence whose input is all read gets its logits handed to its own [`Sequence`] (its own
//!   sampler, seed and stop rules), and the token goes back to the client as an [`Event`].
//!
//! - **choices**: a request for several sequences (`n`, `best_of`) reads its prompt once; when the
//!   prompt is read, its cache is forked (every block shared, the partly filled last one copied on
//!   write) into one sequence per choice, each with its own seed (`seed + i`), all sampled from
//!   the prompt's last logits. A request that asks for its prompt's log-probabilities gets every
//!   row of its prompt chunks' logits from the same batched pass (and reads its whole prompt).
//!
//! - **adapters**: a request may run with a LoRA adapter; its sequence's cache carries it, and the
//!   forward pass adds each adapter's term to its own rows, so one batch mixes adapters and the
//!   base. At most `max_loras` distinct adapters run at once (a request for another waits, and
//!   later arrivals do not overtake it); prefix-cache entries are kept per adapter.
//!
//! A client that goes away drops its event receiver; the scheduler sees the closed channel before
//! the next step and drops the request, whose cache gives its blocks and the rest of its
//! reservation back (a block shared with the prefix cache stays there).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::OwnedSemaphorePermit;
use vicuna_engine::{
    log_softmax_at, propose_all, Draft, DraftLimits, DraftSource, Drafter, FinishReason, GenerationConfig, Sequence,
    Step, TokenLogprob,
};
use vicuna_model::native::{CachedPrefix, LoraAdapter};
use vicuna_model::{KvPool, PrefixCache, QuantCache, QuantLlama, Reservation, BLOCK_TOKENS};
use vicuna_tokenizer::Tokenizer;

use crate::adapters::NamedLora;
use crate::metrics::{Metrics, Outcome};
use crate::tokens::{is_special, token_texts};

pub struct SchedulerConfig {
    /// Most requests in the running batch.
    pub max_batch_size: usize,
    /// The KV budget, in blocks of [`BLOCK_TOKENS`] positions.
    pub kv_blocks: usize,
    /// Largest prompt chunk, and most prompt tokens read in one step.
    pub max_prefill_tokens: usize,
    /// Keep computed KV blocks for later requests that start the same way.
    pub prefix_cache: bool,
    /// Most blocks the prefix cache keeps (`None`: whatever of the budget running requests leave).
    pub prefix_cache_blocks: Option<usize>,
    /// Most distinct LoRA adapters in the running batch.
    pub max_loras: usize,
    /// Speculative decoding: how many tokens a decoding sequence may guess per step (its guesser is
    /// prompt lookup, or the draft model given to [`Scheduler::spawn`]). `None`: no guesses.
    pub speculation: Option<DraftLimits>,
}

/// A validated request on its way to the model.
pub struct Job {
    /// Prompt ids as the model reads them (BOS included when the text got one).
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// Also report the log-probability of every prompt token (TGI's `decoder_input_details`).
    pub prompt_logprobs: bool,
    /// Sequences to generate from the prompt (choice `i` is seeded `config.seed + i`).
    pub choices: usize,
    /// The LoRA adapter it runs with (`None`: the base model).
    pub lora: Option<NamedLora>,
    pub events: UnboundedSender<Event>,
    /// A place among `max_concurrent_requests`, given back when the job is dropped.
    pub permit: OwnedSemaphorePermit,
    pub arrived: Instant,
}

impl Job {
    /// Blocks reserved for this job: everything its sequences may ever hold in their caches, less
    /// `cached_full` full blocks the prefix cache already holds.
    fn blocks(&self, cached_full: usize) -> usize {
        blocks_needed(self.prompt.len(), self.config.max_new_tokens, self.choices, cached_full)
    }
}

/// KV blocks `sequences` sequences of one prompt need at most: the prompt's full blocks once (less
/// `cached_full` the prefix cache holds), and per sequence the blocks after them. The first sequence
/// holds the prompt's partly filled last block and may copy it once forks share it.
pub fn blocks_needed(prompt: usize, max_new_tokens: usize, sequences: usize, cached_full: usize) -> usize {
    let total = (prompt + max_new_tokens).div_ceil(BLOCK_TOKENS);
    if sequences <= 1 {
        return total - cached_full;
    }
    let partial = usize::from(!prompt.is_multiple_of(BLOCK_TOKENS));
    total - cached_full + partial + (sequences - 1) * blocks_per_fork(prompt, max_new_tokens)
}

/// Blocks of one forked sequence: all those after the prompt's full blocks (the partly filled last
/// one copied).
fn blocks_per_fork(prompt: usize, max_new_tokens: usize) -> usize {
    (prompt + max_new_tokens).div_ceil(BLOCK_TOKENS) - prompt / BLOCK_TOKENS
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Text that became final with this token (see `vicuna_engine::Step::text`): the texts of all
    /// tokens add up to the generated text.
    pub text: String,
    pub logprob: f32,
    pub special: bool,
    /// The most likely tokens of the distribution it was drawn from, when asked for.
    pub top: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PromptToken {
    pub id: u32,
    pub text: String,
    /// None for the first token, which has no prefix.
    pub logprob: Option<f32>,
}

#[derive(Clone, Debug)]
pub struct End {
    pub finish_reason: FinishReason,
    /// The whole generated text, stop sequence trimmed.
    pub generated_text: String,
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens read from the prefix cache instead of computed.
    pub cached_tokens: usize,
    /// The seed of this choice, when the request sampled.
    pub seed: Option<u64>,
    /// Prompt tokens with their log-probabilities, when asked for.
    pub prefill: Vec<PromptToken>,
    /// Speculative decoding's guesses checked and kept, when the server speculates.
    pub speculation: Option<Speculated>,
}

/// Guessed tokens of one sequence: checked by the model, and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Speculated {
    pub drafted: usize,
    pub accepted: usize,
}

/// What a request's client receives, in order.
#[derive(Debug)]
pub enum Event {
    /// One generated token of choice `choice`; the last one also carries how that choice ended.
    Token { choice: usize, token: GeneratedToken, end: Option<Box<End>> },
    /// The request ended without finishing (all its choices).
    Stopped(Stop),
}

#[derive(Debug)]
pub enum Stop {
    /// The forward pass failed.
    ModelFailed(String),
    /// The server is shutting down and the grace period is over.
    ShuttingDown(String),
}

enum Message {
    Submit(Box<Job>),
    /// End every waiting and running request with this message (shutdown).
    CancelAll(String),
}

/// The HTTP side's handle on the scheduler thread.
#[derive(Clone)]
pub struct Scheduler {
    inbox: mpsc::Sender<Message>,
    alive: Arc<AtomicBool>,
}

impl Scheduler {
    /// Start the thread. It runs until every `Scheduler` handle is dropped and its work is done.
    /// With `config.speculation`, sequences guess with `draft` (prompt lookup when it is `None`).
    pub fn spawn(
        model: QuantLlama,
        draft: Option<Arc<QuantLlama>>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Scheduler, JoinHandle<()>)> {
        let (inbox, receiver) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        metrics.kv_capacity(config.kv_blocks, BLOCK_TOKENS);
        let thread = std::thread::Builder::new().name("scheduler".into()).spawn(move || {
            // Cleared however the thread ends, a panic included, so /health can tell.
            struct ClearOnExit(Arc<AtomicBool>);
            impl Drop for ClearOnExit {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _alive = ClearOnExit(flag);
            let source = config.speculation.map(|limits| {
                let source = draft.as_deref().map_or(DraftSource::Lookup, DraftSource::Model);
                (source, limits)
            });
            run(&model, source, &tokenizer, &config, &metrics, receiver);
        })?;
        Ok((Scheduler { inbox, alive }, thread))
    }

    /// Queue a job; gives it back if the scheduler thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        self.inbox.send(Message::Submit(Box::new(job))).map_err(|e| match e.0 {
            Message::Submit(job) => job,
            Message::CancelAll(_) => unreachable!("sent a Submit"),
        })
    }

    pub fn cancel_all(&self, reason: &str) {
        let _ = self.inbox.send(Message::CancelAll(reason.to_string()));
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

/// One sequence of a request in the running batch.
struct Active<'t> {
    sequence: Sequence<'t>,
    /// Its guesser, when the server speculates.
    drafter: Option<Drafter<'t>>,
    /// The guesses this step checks (at the end of `pending`).
    draft: Draft,
    /// Which of the request's choices this is.
    choice: usize,
    /// The other choices, still to be forked from this one once the prompt is read.
    forks: Vec<Sequence<'t>>,
    /// Its KV cache, holding its reservation: dropping the request gives both back.
    cache: QuantCache,
    /// Every id in the cache, in order (what its blocks are cached under).
    history: Vec<u32>,
    /// What the model has yet to read: the prompt, then each sampled token in turn.
    pending: Vec<u32>,
    /// How much of `pending` is already in the cache.
    read: usize,
    /// Prompt tokens taken from the prefix cache (all of `history` until its first chunk runs).
    cached_tokens: usize,
    /// Shared by the request's choices; the last to end gives its place back.
    job: Arc<Job>,
    prefill: Vec<PromptToken>,
    last_token_at: Option<Instant>,
}

impl Active<'_> {
    /// Whether a chunk of it has run (until then it may still take a longer cached prefix).
    fn started(&self) -> bool {
        self.history.len() > self.cached_tokens
    }
}

struct Batch<'m> {
    model: &'m QuantLlama,
    tokenizer: &'m Tokenizer,
    config: &'m SchedulerConfig,
    metrics: &'m Metrics,
    waiting: VecDeque<Job>,
    running: Vec<Active<'m>>,
    pool: KvPool,
    prefix: Option<PrefixCache>,
    speculation: Option<(DraftSource<'m>, DraftLimits)>,
}

fn run<'m>(
    model: &'m QuantLlama,
    speculation: Option<(DraftSource<'m>, DraftLimits)>,
    tokenizer: &'m Tokenizer,
    config: &'m SchedulerConfig,
    metrics: &'m Metrics,
    inbox: Receiver<Message>,
) {
    let mut batch = Batch {
        model,
        tokenizer,
        config,
        metrics,
        waiting: VecDeque::new(),
        running: Vec::new(),
        pool: model.new_pool(Some(config.kv_blocks)),
        prefix: config.prefix_cache.then(|| PrefixCache::new(config.prefix_cache_blocks)),
        speculation,
    };
    loop {
        if batch.waiting.is_empty() && batch.running.is_empty() {
            // Nothing to run: sleep until a request comes, or stop once no handle is left.
            match inbox.recv() {
                Ok(message) => batch.receive(message),
                Err(_) => return,
            }
        }
        // Whatever else arrived joins before this step (with no handle left, the work in hand
        // still finishes).
        while let Ok(message) = inbox.try_recv() {
            batch.receive(message);
        }
        batch.drop_cancelled();
        batch.admit();
        if !batch.running.is_empty() {
            batch.step();
        }
        batch.report();
    }
}

impl<'m> Batch<'m> {
    fn receive(&mut self, message: Message) {
        match message {
            Message::Submit(job) => {
                self.metrics.queued(job.prompt.len());
                self.waiting.push_back(*job);
            }
            Message::CancelAll(reason) => {
                for job in self.waiting.drain(..) {
                    let _ = job.events.send(Event::Stopped(Stop::ShuttingDown(reason.clone())));
                    self.metrics.finished(Outcome::Cancelled);
                }
                let jobs = distinct_jobs(&self.running);
                for active in self.running.drain(..) {
                    let _ = active.job.events.send(Event::Stopped(Stop::ShuttingDown(reason.clone())));
                }
                (0..jobs).for_each(|_| self.metrics.finished(Outcome::Cancelled));
            }
        }
        self.report();
    }

    /// Forget requests whose client went away (their caches give their blocks back as they drop).
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + distinct_jobs(&self.running);
        self.waiting.retain(|job| !job.events.is_closed());
        self.running.retain(|active| !active.job.events.is_closed());
        for _ in self.waiting.len() + distinct_jobs(&self.running)..before {
            self.metrics.finished(Outcome::Cancelled);
        }
    }

    /// The longest prefix of `ids` cached for adapter `lora` (none without a prefix cache, or for
    /// a request that scores its whole prompt).
    fn cached_prefix(&mut self, lora: Option<&LoraAdapter>, ids: &[u32], scores_prompt: bool) -> CachedPrefix {
        match self.prefix.as_mut() {
            Some(prefix) if !scores_prompt => prefix.lookup(lora, ids),
            _ => CachedPrefix::default(),
        }
    }

    /// `blocks` blocks of the budget, evicting cached blocks nobody holds when that makes them fit.
    fn reserve(&mut self, blocks: usize) -> Option<Reservation> {
        if let Some(reservation) = self.pool.reserve(blocks) {
            return Some(reservation);
        }
        let prefix = self.prefix.as_mut()?;
        let free = self.pool.available().expect("the scheduler's pool has a budget");
        if free + prefix.idle_blocks() < blocks {
            return None; // evicting would not be enough: keep the cache for later
        }
        loop {
            if let Some(reservation) = self.pool.reserve(blocks) {
                return Some(reservation);
            }
            if !prefix.evict_one() {
                return None;
            }
        }
    }

    /// Move waiting jobs into the batch, in order, while they fit (all of a job's choices at once).
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            if self.running.len() + job.choices > self.config.max_batch_size {
                break;
            }
            if let Some(lora) = &job.lora {
                let adapters = running_adapters(&self.running);
                if !adapters.contains(&lora.name.as_str()) && adapters.len() >= self.config.max_loras {
                    break; // --max-loras other adapters are running: wait until one is done
                }
            }
            let lora = job.lora.as_ref().map(|l| l.adapter.clone());
            let (prompt, scores_prompt) = (job.prompt.clone(), job.prompt_logprobs);
            let (max_new_tokens, choices) = (job.config.max_new_tokens, job.choices);
            // Blocks the prefix fills are not needed again; one it fills in part is copied.
            let prefix = self.cached_prefix(lora.as_deref(), &prompt, scores_prompt);
            let blocks = blocks_needed(prompt.len(), max_new_tokens, choices, prefix.tokens / BLOCK_TOKENS);
            let Some(reservation) = self.reserve(blocks) else {
                break;
            };
            let job = Arc::new(self.waiting.pop_front().expect("front exists"));
            let prefill = if job.prompt_logprobs {
                let texts = token_texts(self.tokenizer, &job.prompt);
                job.prompt.iter().zip(texts).map(|(&id, text)| PromptToken { id, text, logprob: None }).collect()
            } else {
                Vec::new()
            };
            let mut sequences: Vec<Sequence> = (0..job.choices)
                .map(|choice| {
                    let config =
                        GenerationConfig { seed: job.config.seed.wrapping_add(choice as u64), ..job.config.clone() };
                    Sequence::new(&job.prompt, config, Some(self.tokenizer), self.model.config())
                })
                .collect();
            if let Some(done) = sequences.iter().find(|s| s.finish_reason().is_some()) {
                // Validation rules this out (max_new_tokens ≥ 1, prompts shorter than the context, grammars
                // that compile).
                let message = done.error().unwrap_or("nothing to generate").to_string();
                let _ = job.events.send(Event::Stopped(Stop::ModelFailed(message)));
                self.metrics.finished(Outcome::Failed);
                continue;
            }
            let forks = sequences.split_off(1);
            let sequence = sequences.pop().expect("at least one choice");
            let cache = QuantCache::with_prefix(reservation, prefix.blocks, prefix.tokens)
                .expect("the prefix cache shares the pool")
                .with_lora(lora);
            let read = cache.len();
            if self.prefix.is_some() && !job.prompt_logprobs {
                self.metrics.prefix_lookup();
                self.metrics.prefix_hit_tokens(read);
            }
            let drafter = new_drafter(self.speculation, self.model, &job.config, 0);
            self.running.push(Active {
                sequence,
                drafter,
                draft: Draft::default(),
                choice: 0,
                forks,
                cache,
                history: prompt[..read].to_vec(),
                pending: prompt,
                read,
                cached_tokens: read,
                job,
                prefill,
                last_token_at: None,
            });
        }
        if self.running.is_empty() {
            // An empty batch has the whole budget (cached blocks can all be evicted), so the head
            // can never run (validation and the startup checks rule this out); fail it rather
            // than wait forever.
            if let Some(job) = self.waiting.pop_front() {
                let message = format!("the request needs {} KV blocks, more than the budget", job.blocks(0));
                let _ = job.events.send(Event::Stopped(Stop::ModelFailed(message)));
                self.metrics.finished(Outcome::Failed);
            }
        }
    }

    /// One forward pass over the batch, then one token (or, checking guesses, several) for each
    /// sequence whose input is all read.
    fn step(&mut self) {
        let chunks = self.plan_chunks();
        let logits = match self.forward(&chunks) {
            Ok(logits) => logits,
            Err(message) => return self.fail_stepped(&chunks, &message),
        };
        let before = self.record_read(&chunks);
        let finished = self.sample(&chunks, logits);
        self.cache_new_blocks(&before);
        self.finish(finished);
    }

    /// Each sequence's input this step: a decoding one reads its last token; a prefilling one its
    /// next chunk. Chunks are cut at fixed offsets of the prompt whatever else runs, so a
    /// request's numbers do not depend on its neighbours. A request about to read its first chunk
    /// takes any longer cached prefix first (one that a request admitted with it just computed).
    fn plan_chunks(&mut self) -> Vec<usize> {
        let mut prefill_budget = self.config.max_prefill_tokens;
        let mut chunks = Vec::with_capacity(self.running.len());
        for index in 0..self.running.len() {
            if !self.running[index].started() {
                self.take_longer_prefix(index);
            }
        }
        self.guess();
        for index in 0..self.running.len() {
            let chunk = self.next_chunk(index);
            chunks.push(if chunk == 1 || !self.running[index].draft.ids.is_empty() {
                chunk
            } else if chunk <= prefill_budget {
                prefill_budget -= chunk;
                chunk
            } else {
                0
            });
        }
        chunks
    }

    /// Each decoding sequence with a guesser puts its guesses after its last token, for this step to
    /// check (at most what one chunk holds). The draft model guesses for all of them together, one
    /// ragged pass a round ([`propose_all`]), rather than one sequence after another.
    fn guess(&mut self) {
        let max_chunk = self.config.max_prefill_tokens;
        let mut guessing = Vec::new();
        let mut requests = Vec::new();
        for (index, a) in self.running.iter_mut().enumerate() {
            let decoding = a.started() && a.read == 0 && a.pending.len() == 1;
            let Some(drafter) = a.drafter.as_mut().filter(|_| decoding) else { continue };
            if let Some(request) = a.sequence.draft_request(drafter) {
                guessing.push(index);
                requests.push(request);
            }
        }
        let drafts = propose_all(&mut requests);
        drop(requests);
        for (index, draft) in guessing.into_iter().zip(drafts) {
            let a = &mut self.running[index];
            match draft {
                Ok(mut draft) => {
                    draft.ids.truncate(max_chunk - 1);
                    draft.probs.truncate(draft.ids.len());
                    a.pending.extend_from_slice(&draft.ids);
                    a.draft = draft;
                }
                // The draft model failed: this step decodes one token as usual.
                Err(e) => tracing::warn!("drafting failed: {e}"),
            }
        }
    }

    fn next_chunk(&self, index: usize) -> usize {
        let a = &self.running[index];
        (a.pending.len() - a.read).min(self.config.max_prefill_tokens)
    }

    /// Swaps a not yet started request's cache for one on a longer cached prefix, if there is one,
    /// giving back the blocks of its reservation it no longer needs.
    fn take_longer_prefix(&mut self, index: usize) {
        if self.prefix.is_none() || self.running[index].job.prompt_logprobs {
            return;
        }
        let prompt = std::mem::take(&mut self.running[index].pending);
        let lora = self.running[index].cache.lora().cloned();
        let prefix = self.cached_prefix(lora.as_deref(), &prompt, false);
        let active = &mut self.running[index];
        let had = active.cache.len();
        if prefix.tokens > had {
            // The blocks held so far are all cached ones (nothing was computed yet): the longer
            // prefix needs that many fewer blocks of the reservation.
            let fewer = prefix.tokens / BLOCK_TOKENS - had / BLOCK_TOKENS;
            active.cache.restart_from(prefix.blocks, prefix.tokens).expect("the prefix cache shares the pool");
            active.cache.reservation_mut().release(fewer);
            active.read = active.cache.len();
            active.history = prompt[..active.read].to_vec();
            active.cached_tokens = active.read;
            self.metrics.prefix_hit_tokens(active.read - had);
        }
        active.pending = prompt;
    }

    /// Runs the chunks through the model: a prompt chunk of a request that scores its prompt gets
    /// the logits of every row, the others of their last.
    fn forward(&mut self, chunks: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let start = Instant::now();
        let (mut inputs, every_row): (Vec<(&[u32], &mut QuantCache)>, Vec<bool>) = self
            .running
            .iter_mut()
            .zip(chunks)
            .filter(|(_, &chunk)| chunk > 0)
            .map(|(a, &chunk)| {
                let scores = a.job.prompt_logprobs && a.history.len() < a.sequence.prompt().len();
                let checks_guesses = !a.draft.ids.is_empty();
                ((&a.pending[a.read..a.read + chunk], &mut a.cache), scores || checks_guesses)
            })
            .unzip();
        let result = self.model.forward_ragged_rows(&mut inputs, &every_row);
        drop(inputs);
        self.metrics.step(start.elapsed());
        result.map_err(|e| {
            tracing::error!("forward pass failed: {e}");
            format!("the model failed: {e}")
        })
    }

    /// The forward pass failed: their caches may be half written, so everyone in this step fails.
    fn fail_stepped(&mut self, chunks: &[usize], message: &str) {
        let mut stepped = chunks.iter().map(|&chunk| chunk > 0);
        let before = distinct_jobs(&self.running);
        self.running.retain(|active| {
            let stepped = stepped.next().expect("one chunk per request");
            if stepped {
                let _ = active.job.events.send(Event::Stopped(Stop::ModelFailed(message.to_string())));
            }
            !stepped
        });
        for _ in distinct_jobs(&self.running)..before {
            self.metrics.finished(Outcome::Failed);
        }
    }

    /// Records what the step read; returns each stepped sequence's history length before it.
    fn record_read(&mut self, chunks: &[usize]) -> Vec<Option<usize>> {
        let mut before = Vec::with_capacity(chunks.len());
        for (active, &chunk) in self.running.iter_mut().zip(chunks) {
            before.push((chunk > 0).then_some(active.history.len()));
            active.history.extend_from_slice(&active.pending[active.read..active.read + chunk]);
            active.read += chunk;
        }
        before
    }

    /// Offers every block the step filled (of what the sequences kept) to the prefix cache.
    fn cache_new_blocks(&mut self, before: &[Option<usize>]) {
        let Some(prefix) = self.prefix.as_mut() else { return };
        for (active, before) in self.running.iter().zip(before) {
            if let Some(before) = *before {
                if active.history.len() / BLOCK_TOKENS > before / BLOCK_TOKENS {
                    prefix.insert(active.cache.lora().map(|a| &**a), &active.history, active.cache.blocks());
                }
            }
        }
    }

    /// A token for each sequence whose input is all read (a request's other choices are forked
    /// from it first); returns those that finished, with their last token.
    fn sample(&mut self, chunks: &[usize], logits: Vec<Vec<f32>>) -> Vec<(usize, GeneratedToken)> {
        let mut logits = logits.into_iter();
        let now = Instant::now();
        let vocab = self.model.config().vocab_size;
        let mut finished = Vec::new();
        let mut forked = Vec::new();
        for (index, (active, &chunk)) in self.running.iter_mut().zip(chunks).enumerate() {
            if chunk == 0 {
                continue;
            }
            let mut row = logits.next().expect("one row per stepped sequence");
            if !active.draft.ids.is_empty() {
                finished.extend(
                    check_guesses(active, &mut row, vocab, self.metrics, self.tokenizer, now).map(|t| (index, t)),
                );
                continue;
            }
            if row.len() > vocab {
                // Every row of a prompt chunk: row r predicts the prompt token after position r.
                let first = active.read - chunk;
                for (r, logits) in row.chunks_exact(vocab).enumerate() {
                    if let Some(&next) = active.pending.get(first + r + 1) {
                        active.prefill[first + r + 1].logprob = Some(log_softmax_at(logits, next as usize) as f32);
                    }
                }
                row.drain(..row.len() - vocab);
            }
            if active.read < active.pending.len() {
                continue; // more prompt to read first
            }
            for sequence in std::mem::take(&mut active.forks) {
                let blocks = blocks_per_fork(active.pending.len(), active.job.config.max_new_tokens);
                let reservation = active.cache.reservation_mut().split(blocks).expect("reserved at admission");
                let cache = active.cache.fork(reservation).expect("a fork shares the pool");
                let choice = active.choice + 1 + forked.len();
                let drafter = new_drafter(self.speculation, self.model, &active.job.config, choice);
                let fork = Active {
                    sequence,
                    drafter,
                    draft: Draft::default(),
                    choice,
                    forks: Vec::new(),
                    cache,
                    history: active.history.clone(),
                    pending: active.pending.clone(),
                    read: active.read,
                    cached_tokens: active.cached_tokens,
                    job: active.job.clone(),
                    prefill: active.prefill.clone(),
                    last_token_at: None,
                };
                forked.push((fork, row.clone()));
            }
            if let Some(token) = advance(active, &mut row, self.tokenizer, self.metrics, now) {
                finished.push((index, token));
            }
        }
        for (mut fork, mut row) in forked {
            if let Some(token) = advance(&mut fork, &mut row, self.tokenizer, self.metrics, now) {
                finished.push((self.running.len(), token));
            }
            self.running.push(fork);
        }
        finished
    }

    /// Ends the finished sequences: their blocks go back (or stay in the prefix cache) and the new
    /// state is published before their clients hear of the end, so what a client sees next in
    /// /metrics already counts it.
    fn finish(&mut self, mut finished: Vec<(usize, GeneratedToken)>) {
        let mut ended: Vec<(Arc<Job>, usize, GeneratedToken, End)> = Vec::with_capacity(finished.len());
        finished.sort_by_key(|(index, _)| *index);
        for (index, token) in finished.into_iter().rev() {
            let Active { sequence, job, prefill, cached_tokens, cache, history, choice, drafter, .. } =
                self.running.remove(index);
            if let Some(prefix) = self.prefix.as_mut() {
                prefix.insert_finished(cache.lora().map(|a| &**a), &history, cache.blocks());
            }
            drop(cache);
            let prompt_tokens = sequence.prompt().len();
            let seed = job.config.seed.wrapping_add(choice as u64);
            let generation = sequence.into_generation();
            tracing::info!(
                "request done: {prompt_tokens} prompt + {} generated tokens in {:.3}s ({})",
                generation.ids.len(),
                job.arrived.elapsed().as_secs_f64(),
                generation.finish_reason.as_str()
            );
            let end = End {
                finish_reason: generation.finish_reason,
                generated_text: generation.text.unwrap_or_default(),
                generated_tokens: generation.ids.len(),
                prompt_tokens,
                cached_tokens,
                seed: job.config.sampling.do_sample.then_some(seed),
                prefill,
                speculation: drafter.map(|d| Speculated { drafted: d.drafted, accepted: d.accepted }),
            };
            ended.push((job, choice, token, end));
        }
        // A request ends with its last running choice (counted once when several end in this step).
        for (i, (job, _, _, end)) in ended.iter().enumerate() {
            let still_running = self.running.iter().any(|a| Arc::ptr_eq(&a.job, job));
            let counted = ended[..i].iter().any(|(other, ..)| Arc::ptr_eq(other, job));
            if !still_running && !counted {
                self.metrics.finished(end.finish_reason.into());
            }
        }
        self.report();
        for (job, choice, token, end) in ended {
            let event = Event::Token { choice, token, end: Some(Box::new(end)) };
            match Arc::try_unwrap(job) {
                Ok(Job { events, permit, .. }) => {
                    // The request's last choice: its place among max_concurrent_requests is free
                    // before the client can ask again.
                    drop(permit);
                    let _ = events.send(event);
                }
                Err(job) => {
                    let _ = job.events.send(event);
                }
            }
        }
    }

    fn report(&self) {
        let counts = self.pool.counts();
        let (cached, idle, stats) = match &self.prefix {
            Some(p) => (p.len(), p.idle_blocks(), p.stats()),
            None => (0, 0, Default::default()),
        };
        // Blocks running requests hold or have reserved; cached blocks nobody holds are free to evict.
        let in_use = counts.allocated + counts.reserved - idle;
        self.metrics.scheduler_state(self.waiting.len(), distinct_jobs(&self.running), in_use);
        let waiting: Vec<&str> =
            self.waiting.iter().filter_map(|job| job.lora.as_ref()).map(|l| l.name.as_str()).collect();
        self.metrics.lora_state(&adapter_requests(&self.running), &waiting);
        self.metrics.prefix_cache_state(cached, stats);
    }
}

/// Samples a sequence's next token from `row` and tells its client, unless it finished: then the
/// token is returned for [`Batch::finish`] to send with the end.
fn advance(
    active: &mut Active,
    row: &mut [f32],
    tokenizer: &Tokenizer,
    metrics: &Metrics,
    now: Instant,
) -> Option<GeneratedToken> {
    let step = active.sequence.advance(row);
    deliver(active, step, tokenizer, metrics, now)
}

/// Checks a sequence's guesses against the rows of its step (one after its last token and each
/// guess): the tokens it keeps and one of the model's own go to its client as [`advance`] sends
/// one, and its cache and history drop the refused guesses. Returns the last token if it finished.
fn check_guesses(
    active: &mut Active,
    rows: &mut [f32],
    vocab: usize,
    metrics: &Metrics,
    tokenizer: &Tokenizer,
    now: Instant,
) -> Option<GeneratedToken> {
    let draft = std::mem::take(&mut active.draft);
    let mut steps: Vec<Step> = Vec::with_capacity(draft.ids.len() + 1);
    active.sequence.check_draft(rows, vocab, &draft, |step| steps.push(step));
    let kept = steps.len() - 1;
    active.drafter.as_mut().expect("a draft came from the drafter").record(draft.ids.len(), kept);
    metrics.speculated(draft.ids.len(), kept);
    // The cache keeps the last token and the kept guesses; the model's own token goes in next.
    let keep = active.cache.len() - draft.ids.len() + kept;
    active.cache.truncate(keep);
    active.history.truncate(keep);
    let mut last = None;
    for step in steps {
        last = deliver(active, step, tokenizer, metrics, now);
    }
    last
}

/// Tells a sequence's client of its new token, unless it finished: then the token is returned for
/// [`Batch::finish`] to send with the end. The token is what the model reads next.
fn deliver(
    active: &mut Active,
    step: Step,
    tokenizer: &Tokenizer,
    metrics: &Metrics,
    now: Instant,
) -> Option<GeneratedToken> {
    let token = GeneratedToken {
        id: step.id,
        text: step.text,
        logprob: step.logprob,
        special: is_special(tokenizer, step.id),
        top: step.top,
    };
    let since_previous = active.last_token_at.map(|t| now - t);
    // Time to first token is the request's: its first choice's.
    let since_arrival = (active.last_token_at.is_none() && active.choice == 0).then(|| now - active.job.arrived);
    metrics.token_generated(since_previous, since_arrival);
    active.last_token_at = Some(now);
    active.pending = vec![step.id];
    active.read = 0;
    if step.finish_reason.is_some() {
        return Some(token);
    }
    // A closed channel is noticed before the next step (`drop_cancelled`).
    let _ = active.job.events.send(Event::Token { choice: active.choice, token, end: None });
    None
}

/// A guesser for choice `choice` of a request (seeded as its sequence is), when the server speculates.
fn new_drafter<'m>(
    speculation: Option<(DraftSource<'m>, DraftLimits)>,
    model: &QuantLlama,
    config: &GenerationConfig,
    choice: usize,
) -> Option<Drafter<'m>> {
    let (source, limits) = speculation?;
    let seed = config.seed.wrapping_add(choice as u64);
    match source.drafter(model, config.sampling.clone(), seed, limits) {
        Ok(drafter) => Some(drafter),
        Err(e) => {
            // The draft model's vocabulary is checked at start, so this does not happen.
            tracing::warn!("no speculative decoding for this request: {e}");
            None
        }
    }
}

/// The names of the adapters the running batch uses, each once, sorted.
fn running_adapters<'a>(running: &'a [Active]) -> Vec<&'a str> {
    let mut names = adapter_requests(running);
    names.dedup();
    names
}

/// The adapter of each running request that has one (a name once per request), sorted.
fn adapter_requests<'a>(running: &'a [Active]) -> Vec<&'a str> {
    let mut jobs: Vec<&Arc<Job>> = running.iter().map(|a| &a.job).collect();
    jobs.sort_unstable_by_key(|job| Arc::as_ptr(job));
    jobs.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let mut names: Vec<&str> = jobs.iter().filter_map(|job| job.lora.as_ref()).map(|l| l.name.as_str()).collect();
    names.sort_unstable();
    names
}

/// Requests in the batch (a request with several choices runs as several sequences).
fn distinct_jobs(running: &[Active]) -> usize {
    let mut jobs: Vec<*const Job> = running.iter().map(|a| Arc::as_ptr(&a.job)).collect();
    jobs.sort_unstable();
    jobs.dedup();
    jobs.len()
}
