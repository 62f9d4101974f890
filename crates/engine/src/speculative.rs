//! Speculative decoding for one sequence: a cheap guess of the next tokens, checked by one pass of
//! the model over all of them (a k-row pass costs little more than one row, since the weights are
//! read once), keeping the longest prefix the model agrees with and one token of its own.
//!
//! Two guessers, as llama.cpp and transformers offer them:
//! - **prompt lookup** (`--lookup`): the tokens that followed the latest earlier occurrence of the
//!   context's last n-gram (n from [`LOOKUP_NGRAM_MAX`] down to 1). No extra weights; it pays off
//!   where the output copies the input (quoting, editing, repeating).
//! - **a draft model** (`--draft-model`): a small model with the same vocabulary decodes k tokens
//!   ahead, in its own KV cache, sampled with the same parameters.
//!
//! Both are exact: greedy output is the same token for token as without speculation, and sampled
//! output keeps the model's distribution (see [`Sampler::sample_draft`]).

use vicuna_model::{Error, QuantLlama, Result};

use crate::generate::Context;
use crate::sampling::{Distribution, History, Sampler, SamplingParams};

/// Longest n-gram prompt lookup matches (transformers' `max_matching_ngram_size` is 2; llama.cpp's
/// lookup tries up to 4).
pub const LOOKUP_NGRAM_MAX: usize = 3;

/// How many tokens to guess per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftLimits {
    /// At most this many (llama.cpp's `--draft-max`).
    pub max: usize,
    /// Guesses shorter than this are not checked; the step decodes one token as usual
    /// (llama.cpp's `--draft-min`).
    pub min: usize,
    /// A draft model stops guessing at a token it gives less probability than this (under its own
    /// processed distribution), as llama.cpp's `--draft-p-min`: an unsure draft is seldom kept, and
    /// each guess costs a row of the checking pass. 0: always up to `max`. Lookup ignores it.
    pub p_min: f32,
}

impl Default for DraftLimits {
    fn default() -> Self {
        DraftLimits { max: 8, min: 1, p_min: 0.0 }
    }
}

impl DraftLimits {
    /// Limits a drafter can work with, named by their flags in the message: `--draft-max` at least 1,
    /// `--draft-min` at most `--draft-max` (0 means no minimum, as llama.cpp's default: the same as 1),
    /// `--draft-p-min` in [0, 1).
    pub fn check(self) -> Result<Self> {
        let DraftLimits { max, min, p_min } = self;
        if max == 0 || min > max {
            return Err(Error::msg(format!(
                "--draft-max {max} and --draft-min {min}: --draft-max must be at least 1, and --draft-min at most \
                 --draft-max"
            )));
        }
        if !(0.0..1.0).contains(&p_min) {
            return Err(Error::msg(format!("--draft-p-min {p_min}: must be at least 0 and below 1")));
        }
        Ok(DraftLimits { max, min: min.max(1), p_min })
    }
}

/// Where the guesses come from.
pub enum Guesser<'m> {
    Lookup,
    Model { model: &'m QuantLlama, context: Context, sampler: Sampler },
}

/// What a command's or server's drafters are made from: prompt lookup, or a draft model (each
/// drafter then keeps its own cache of it).
#[derive(Clone, Copy)]
pub enum DraftSource<'m> {
    Lookup,
    Model(&'m QuantLlama),
}

impl<'m> DraftSource<'m> {
    /// A drafter for one sequence of `target`, sampling as `params` with `seed` (see
    /// [`Drafter::model`]; a draft model of another vocabulary is refused).
    pub fn drafter(
        self,
        target: &QuantLlama,
        params: SamplingParams,
        seed: u64,
        limits: DraftLimits,
    ) -> Result<Drafter<'m>> {
        match self {
            DraftSource::Lookup => Ok(Drafter::lookup(limits)),
            DraftSource::Model(draft) => Drafter::model(draft, target, params, seed, limits),
        }
    }
}

/// A guesser with its limits and what it achieved.
pub struct Drafter<'m> {
    guesser: Guesser<'m>,
    limits: DraftLimits,
    /// Tokens guessed and checked.
    pub drafted: usize,
    /// Guessed tokens the model kept.
    pub accepted: usize,
}

/// The guesses for one step: ids, and for a sampling draft model the distribution each was drawn
/// from (a lookup guess or a greedy draft has none: its mass is all on the guess).
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub ids: Vec<u32>,
    pub probs: Vec<Distribution>,
}

impl<'m> Drafter<'m> {
    pub fn lookup(limits: DraftLimits) -> Self {
        Drafter { guesser: Guesser::Lookup, limits, drafted: 0, accepted: 0 }
    }

    /// A draft model for `target`: refused unless both have the same vocabulary size. It samples
    /// with `params` from its own random stream (derived from `seed`).
    pub fn model(
        draft: &'m QuantLlama,
        target: &QuantLlama,
        params: SamplingParams,
        seed: u64,
        limits: DraftLimits,
    ) -> Result<Self> {
        let (d, t) = (draft.config(), target.config());
        if d.vocab_size != t.vocab_size {
            return Err(vicuna_model::Error::msg(format!(
                "the draft model's vocabulary has {} tokens and the model's {}: a draft must use the model's \
                 tokenizer (same vocabulary size)",
                d.vocab_size, t.vocab_size
            )));
        }
        let sampler = Sampler::new(params, seed ^ 0x9e37_79b9_7f4a_7c15);
        Ok(Drafter {
            guesser: Guesser::Model { model: draft, context: Context::new(draft), sampler },
            limits,
            drafted: 0,
            accepted: 0,
        })
    }

    /// Counts one checked draft of `drafted` guesses, `accepted` of them kept.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        self.drafted += drafted;
        self.accepted += accepted;
    }

    /// Share of the guessed tokens the model kept (None before any guess).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }

    /// Up to `room` (and the limits) guesses of what follows `context`, whose first `prompt_len`
    /// ids are the prompt; empty when fewer than the minimum.
    pub fn propose(&mut self, context: &[u32], prompt_len: usize, room: usize) -> Result<Draft> {
        let mut request = [DraftRequest { drafter: self, context, prompt_len, room }];
        propose_all(&mut request).pop().expect("one request, one draft")
    }
}

/// One sequence's call for guesses, for [`propose_all`]: its drafter, its context (the first
/// `prompt_len` ids the prompt) and the room left for guesses.
pub struct DraftRequest<'a, 'm> {
    pub drafter: &'a mut Drafter<'m>,
    pub context: &'a [u32],
    pub prompt_len: usize,
    pub room: usize,
}

/// [`Drafter::propose`] for several sequences at once (a server's batch), with the same guesses
/// each would make alone: lookup drafters guess on their own; drafters of one draft model take
/// each of their rounds together, one ragged pass of it over every sequence still guessing, so
/// the draft model's weights are read once a round for all of them instead of once per sequence.
/// (A row's logits do not depend on the rows beside it, except where a quantized draft model is
/// run by the AVX-512 GEMM: from 10–17 rows in one pass, see `vicuna_kernels`' kernel table.) A
/// failed pass fails the drafts of every sequence in it.
pub fn propose_all(requests: &mut [DraftRequest<'_, '_>]) -> Vec<Result<Draft>> {
    let mut results: Vec<Option<Result<Draft>>> = requests.iter().map(|_| None).collect();
    let mut pending: Vec<(usize, &QuantLlama, Guessing)> = Vec::new();
    for (i, request) in requests.iter_mut().enumerate() {
        let limits = request.drafter.limits;
        let k = limits.max.min(request.room);
        if k == 0 || k < limits.min {
            results[i] = Some(Ok(Draft::default()));
            continue;
        }
        match &mut request.drafter.guesser {
            Guesser::Lookup => {
                let ids = lookup(request.context, LOOKUP_NGRAM_MAX, k);
                results[i] = Some(Ok(Draft { ids, probs: Vec::new() }));
            }
            Guesser::Model { model, context: cache, sampler } => {
                let guessing = Guessing::new(cache, sampler, request.context, request.prompt_len, k, limits.p_min);
                pending.push((i, *model, guessing));
            }
        }
    }
    // One batch per draft model (a server has one).
    while let Some(&(_, model, _)) = pending.first() {
        let (same, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, m, _)| std::ptr::eq(*m, model));
        pending = rest;
        let (indices, mut batch): (Vec<usize>, Vec<Guessing>) = same.into_iter().map(|(i, _, g)| (i, g)).unzip();
        let outcome = draft_rounds(model, &mut batch);
        for (i, guessing) in indices.into_iter().zip(batch) {
            results[i] = Some(match &outcome {
                Ok(()) => Ok(guessing.draft),
                Err(e) => Err(Error::msg(e.to_string())),
            });
        }
    }
    results
        .into_iter()
        .zip(requests.iter())
        .map(|(result, request)| {
            let draft = result.expect("every request answered")?;
            Ok(if draft.ids.len() < request.drafter.limits.min { Draft::default() } else { draft })
        })
        .collect()
}

/// Prompt lookup: the continuation (at most `k` tokens) of the latest earlier occurrence of the
/// context's last n tokens, trying n = `ngram_max` down to 1.
pub fn lookup(context: &[u32], ngram_max: usize, k: usize) -> Vec<u32> {
    let len = context.len();
    for n in (1..=ngram_max.min(len.saturating_sub(1))).rev() {
        let pattern = &context[len - n..];
        // Latest match first; a match must end before the pattern itself does.
        for start in (0..len - n).rev() {
            if &context[start..start + n] == pattern {
                let from = start + n;
                return context[from..(from + k).min(len)].to_vec();
            }
        }
    }
    Vec::new()
}

/// One sequence's draft in the making: up to `k` tokens from the draft model after its context,
/// its cache reused across steps; it stops before a token it gives less than `p_min`.
struct Guessing<'a> {
    cache: &'a mut Context,
    sampler: &'a mut Sampler,
    /// The ids the next round feeds the draft model: the context past what its cache holds, then
    /// each guess.
    input: Vec<u32>,
    /// The context and the guesses so far (for the sampler's penalties).
    seen: Vec<u32>,
    prompt_len: usize,
    k: usize,
    p_min: f32,
    draft: Draft,
    stopped: bool,
}

impl<'a> Guessing<'a> {
    fn new(
        cache: &'a mut Context,
        sampler: &'a mut Sampler,
        context: &[u32],
        prompt_len: usize,
        k: usize,
        p_min: f32,
    ) -> Self {
        let reused = cache.reuse(context);
        let input = context[reused..].to_vec();
        Guessing {
            cache,
            sampler,
            input,
            seen: context.to_vec(),
            prompt_len,
            k,
            p_min,
            draft: Draft::default(),
            stopped: false,
        }
    }
}

/// Rounds of the draft model over every sequence of `batch` still guessing, one ragged pass each,
/// until each has its `k` guesses or stopped.
fn draft_rounds(model: &QuantLlama, batch: &mut [Guessing]) -> Result<()> {
    loop {
        let mut active: Vec<&mut Guessing> =
            batch.iter_mut().filter(|g| !g.stopped && g.draft.ids.len() < g.k).collect();
        if active.is_empty() {
            return Ok(());
        }
        let mut inputs: Vec<(&[u32], &mut vicuna_model::QuantCache)> = active
            .iter_mut()
            .map(|g| {
                let Guessing { input, cache, .. } = &mut **g;
                (&input[..], cache.cache_mut())
            })
            .collect();
        let logits = model.forward_ragged(&mut inputs)?;
        drop(inputs);
        for (g, mut logits) in active.into_iter().zip(logits) {
            g.cache.extend_ids(&g.input);
            let history = History { context: &g.seen, prompt_len: g.prompt_len };
            let dist = g.sampler.distribution(&mut logits, history, &[], 0);
            let id = match g.sampler.draw_from(&dist) {
                Some(id) if dist.confidence(id) >= f64::from(g.p_min) => id,
                _ => {
                    g.stopped = true;
                    continue;
                }
            };
            if matches!(dist, Distribution::Sparse { .. }) {
                g.draft.probs.push(dist);
            }
            g.draft.ids.push(id);
            g.seen.push(id);
            g.input = vec![id];
        }
    }
}
