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
        let k = self.limits.max.min(room);
        if k == 0 || k < self.limits.min {
            return Ok(Draft::default());
        }
        let draft = match &mut self.guesser {
            Guesser::Lookup => Draft { ids: lookup(context, LOOKUP_NGRAM_MAX, k), probs: Vec::new() },
            Guesser::Model { model, context: cache, sampler } => {
                draft_tokens(model, cache, sampler, context, prompt_len, k, self.limits.p_min)?
            }
        };
        if draft.ids.len() < self.limits.min {
            return Ok(Draft::default());
        }
        Ok(draft)
    }
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

/// Up to `k` tokens from the draft model after `context`, its cache reused across steps; it stops
/// before a token it gives less than `p_min`.
fn draft_tokens(
    model: &QuantLlama,
    cache: &mut Context,
    sampler: &mut Sampler,
    context: &[u32],
    prompt_len: usize,
    k: usize,
    p_min: f32,
) -> Result<Draft> {
    let reused = cache.reuse(context);
    let mut input = context[reused..].to_vec();
    let mut seen = context.to_vec();
    let mut draft = Draft::default();
    for _ in 0..k {
        let mut logits = model.next_token_logits(&input, cache.cache_mut())?;
        cache.extend_ids(&input);
        let history = History { context: &seen, prompt_len };
        let dist = sampler.distribution(&mut logits, history, &[], 0);
        let Some(id) = sampler.draw_from(&dist) else { break };
        if dist.confidence(id) < f64::from(p_min) {
            break;
        }
        if matches!(dist, Distribution::Sparse { .. }) {
            draft.probs.push(dist);
        }
        draft.ids.push(id);
        seen.push(id);
        input = vec![id];
    }
    Ok(draft)
}
