//! The generation loop: prefill the prompt, then one token at a time through the KV cache, with
//! EOS, min/max new tokens and stop sequences decided the way transformers and TGI decide them.

use std::sync::Arc;

use vicuna_model::{LlamaConfig, QuantCache, QuantLlama, Result};
use vicuna_tokenizer::Tokenizer;

use crate::constraint::{Allowed, Constraint, Grammar};
use crate::sampling::{Distribution, History, Sampler, SamplingParams, TokenLogprob};
use crate::speculative::{Draft, DraftRequest, Drafter};

/// Everything that shapes one generation besides the prompt.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// EOS is masked until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Strings that end the generation when they appear in the decoded text (also across token
    /// boundaries); the match and anything after it are trimmed from the text.
    pub stop: Vec<String>,
    /// Keep going past EOS (for benchmarks and fixed-length runs).
    pub ignore_eos: bool,
    pub seed: u64,
    /// Report this many of the most likely tokens with each step (OpenAI's `top_logprobs`, TGI's
    /// `top_n_tokens`); 0: none.
    pub top_logprobs: usize,
    /// Structured output: every token must keep the text within this grammar (JSON schema, regex, Lark).
    pub grammar: Option<Arc<Grammar>>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            min_new_tokens: 0,
            stop: Vec::new(),
            ignore_eos: false,
            seed: 0,
            top_logprobs: 0,
            grammar: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl FinishReason {
    /// The names TGI uses in its responses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids, including the EOS or the token that completed a stop sequence.
    pub ids: Vec<u32>,
    /// Decoded text (stop sequence trimmed); None without a tokenizer.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
}

/// Generate after `prompt` (ids used as given). `on_text` receives the text as it becomes final:
/// complete UTF-8, and never a part that a stop sequence could still claim.
pub fn generate(
    model: &QuantLlama,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_in(&mut Context::new(model), model, tokenizer, prompt, config, on_text)
}

/// [`generate`] in a context kept from earlier generations: the longest common prefix of the
/// prompt and what the context holds is read from its cache (always leaving one prompt token to
/// compute), the rest is computed, and the context then holds the prompt and the reply.
pub fn generate_in(
    context: &mut Context,
    model: &QuantLlama,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_speculative(context, model, tokenizer, prompt, config, None, on_text)
}

/// [`generate_in`], checking `drafter`'s guesses when there is one (speculative decoding, see
/// [`crate::speculative`]): each step runs the model once over the last token and the guesses,
/// keeps the guesses up to the first the model disagrees with plus one token of its own, and
/// drops the rest from the cache. The output is what [`generate_in`] gives (greedy: the same
/// tokens; sampling: the same distribution). Structured output decodes without guesses.
pub fn generate_speculative(
    context: &mut Context,
    model: &QuantLlama,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut drafter: Option<&mut Drafter>,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    model.check_ids(prompt)?;
    let mut sequence = Sequence::new(prompt, config.clone(), tokenizer, model.config());
    let reused = context.reuse(prompt);
    let mut input = prompt[reused..].to_vec();
    let vocab = model.config().vocab_size;
    while sequence.finish_reason().is_none() {
        // The prompt's step computes one row; guesses follow single tokens.
        let draft = match drafter.as_deref_mut() {
            Some(d) if input.len() == 1 => sequence.draft(d)?,
            _ => Draft::default(),
        };
        if draft.ids.is_empty() {
            let mut logits = model.next_token_logits(&input, &mut context.cache)?;
            context.ids.append(&mut input);
            let step = sequence.advance(&mut logits);
            on_text(&step.text);
            input = vec![step.id];
            continue;
        }
        let before = context.ids.len();
        let ids: Vec<u32> = input.iter().chain(&draft.ids).copied().collect();
        let mut logits = model.forward_all(&ids, &mut context.cache)?;
        context.ids.extend_from_slice(&ids);
        let mut last = input[0];
        let steps = sequence.check_draft(&mut logits, vocab, &draft, |step| {
            on_text(&step.text);
            last = step.id;
        });
        drafter.as_deref_mut().expect("a draft came from the drafter").record(draft.ids.len(), steps - 1);
        // The cache keeps every token produced this step but the last, which goes in next.
        let keep = before + input.len() + steps - 1;
        context.cache.truncate(keep);
        context.ids.truncate(keep);
        input = vec![last];
    }
    Ok(sequence.into_generation())
}

/// One sequence's KV cache and the ids it holds, kept from one generation to the next (a chat's
/// turns), so that a prompt starting like the last context reads only what is new.
pub struct Context {
    cache: QuantCache,
    /// The ids whose keys and values the cache holds, in order.
    ids: Vec<u32>,
    /// Prompt tokens the last generation took from the cache.
    reused: usize,
}

impl Context {
    pub fn new(model: &QuantLlama) -> Self {
        Context { cache: model.new_cache(), ids: Vec::new(), reused: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Forgets everything (a new conversation).
    pub fn clear(&mut self) {
        self.cache.clear();
        self.ids.clear();
    }

    /// Prompt tokens the last generation took from the cache instead of computing them.
    pub fn reused(&self) -> usize {
        self.reused
    }

    pub(crate) fn cache_mut(&mut self) -> &mut QuantCache {
        &mut self.cache
    }

    /// Records that the cache now also holds `ids` (after a step over them).
    pub(crate) fn extend_ids(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
    }

    /// Keeps the longest common prefix of `prompt` and the context (one prompt token short at
    /// most, so that a step computes the logits); returns its length.
    pub(crate) fn reuse(&mut self, prompt: &[u32]) -> usize {
        let common = self.ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let keep = common.min(prompt.len().saturating_sub(1));
        // The cache and the ids always agree: a failed step leaves neither changed.
        debug_assert_eq!(self.cache.len(), self.ids.len());
        self.cache.truncate(keep);
        self.ids.truncate(keep);
        self.reused = keep;
        keep
    }
}

/// One generation in progress: its sampler and random stream, its context, the text decoded so
/// far and why it ended. The model runs elsewhere (one sequence in `generate`, many in a server's
/// batch); this decides what each new set of logits means.
pub struct Sequence<'a> {
    config: GenerationConfig,
    sampler: Sampler,
    /// Prompt and generated ids.
    context: Vec<u32>,
    prompt_len: usize,
    text: Option<TextState<'a>>,
    eos: u32,
    context_limit: usize,
    finish_reason: Option<FinishReason>,
    /// Where the output stands in `config.grammar`.
    constraint: Option<Constraint>,
    /// Why the sequence could not run (its grammar could not start).
    error: Option<String>,
}

/// What one `advance` produced.
#[derive(Clone, Debug)]
pub struct Step {
    pub id: u32,
    /// log-probability of `id` under the distribution it was drawn from.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of that distribution.
    pub top: Vec<TokenLogprob>,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// Set when this token ended the generation.
    pub finish_reason: Option<FinishReason>,
}

impl<'a> Sequence<'a> {
    /// `model` is the config of the model that will compute the logits: its EOS (when there is no tokenizer)
    /// and context length.
    pub fn new(
        prompt: &[u32],
        config: GenerationConfig,
        tokenizer: Option<&'a Tokenizer>,
        model: &LlamaConfig,
    ) -> Self {
        let eos = tokenizer.map_or(model.eos_token_id, |t| t.eos_id());
        let text = tokenizer.map(|t| TextState::new(t, prompt));
        let context_limit = model.max_position_embeddings;
        // Nothing to generate: finished before the first step (no model call needed).
        let mut finish_reason =
            (config.max_new_tokens == 0 || prompt.len() >= context_limit).then_some(FinishReason::Length);
        let (constraint, error) = match config.grammar.as_ref().map(Constraint::new) {
            None => (None, None),
            Some(Ok(constraint)) => (Some(constraint), None),
            Some(Err(message)) => {
                finish_reason = Some(FinishReason::Length);
                (None, Some(message))
            }
        };
        Sequence {
            sampler: Sampler::new(config.sampling.clone(), config.seed),
            config,
            context: prompt.to_vec(),
            prompt_len: prompt.len(),
            text,
            eos,
            context_limit,
            finish_reason,
            constraint,
            error,
        }
    }

    /// Why the sequence ended before its first step without generating anything, when that was an error.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn prompt(&self) -> &[u32] {
        &self.context[..self.prompt_len]
    }

    pub fn generated(&self) -> &[u32] {
        &self.context[self.prompt_len..]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason
    }

    /// Tokens this sequence may still generate (max_new_tokens and the context length).
    pub fn room(&self) -> usize {
        let by_count = self.config.max_new_tokens.saturating_sub(self.generated().len());
        by_count.min(self.context_limit.saturating_sub(self.context.len()))
    }

    /// Choose the next token from the logits after everything so far (`logits` is scratch).
    pub fn advance(&mut self, logits: &mut [f32]) -> Step {
        self.advance_with(logits, None).0
    }

    /// [`Sequence::advance`], checking a guess when there is one (`(token, the distribution it was
    /// drawn from)`, see [`Sampler::sample_draft`]); says whether the token is the guess.
    pub fn advance_with(&mut self, logits: &mut [f32], guess: Option<(u32, Option<&Distribution>)>) -> (Step, bool) {
        debug_assert!(self.finish_reason.is_none(), "advance after the end");
        let mut ban: &[u32] = if self.generated().len() < self.config.min_new_tokens { &[self.eos] } else { &[] };
        if let Some(constraint) = self.constraint.as_mut() {
            let allowed = match constraint.mask(logits) {
                Ok(allowed) => allowed,
                Err(_) => {
                    // The grammar cannot go on (it never should): end the output here.
                    self.constraint = None;
                    let eos = logits[self.eos as usize];
                    logits.fill(f32::NEG_INFINITY);
                    logits[self.eos as usize] = if eos.is_finite() { eos } else { 0.0 };
                    Allowed::OnlyEnd
                }
            };
            // When the grammar allows only the end, the end comes whatever `min_new_tokens` says.
            if allowed == Allowed::OnlyEnd {
                ban = &[];
            }
        }
        let history = History { context: &self.context, prompt_len: self.prompt_len };
        let top_n = self.config.top_logprobs;
        let (pick, kept) = match guess {
            None => (self.sampler.sample(logits, history, ban, top_n), false),
            Some((token, q)) => self.sampler.sample_draft(logits, history, ban, top_n, token, q),
        };
        let id = pick.id;
        if let Some(constraint) = self.constraint.as_mut() {
            // A token the grammar refuses (never one it allowed) leaves it in error: the next mask ends the output.
            let _ = constraint.commit(id);
        }
        self.context.push(id);
        let mut text = String::new();
        let mut finish = None;
        if id == self.eos && !self.config.ignore_eos {
            finish = Some(FinishReason::EosToken);
        } else if let Some(state) = self.text.as_mut() {
            if state.push(id, &self.config.stop, &mut text) {
                finish = Some(FinishReason::StopSequence);
            }
        }
        if finish.is_none()
            && (self.generated().len() >= self.config.max_new_tokens || self.context.len() >= self.context_limit)
        {
            finish = Some(FinishReason::Length);
        }
        if let (Some(reason), Some(state)) = (finish, self.text.as_mut()) {
            state.finish(reason, &mut text);
        }
        self.finish_reason = finish;
        (Step { id, logprob: pick.logprob, top: pick.top, text, finish_reason: finish }, kept)
    }

    /// Guesses of what follows, for a step that checks them (see [`crate::speculative`]): none for
    /// structured output, and never past the room left (one token of the step is the model's own).
    pub fn draft(&self, drafter: &mut Drafter) -> Result<Draft> {
        match self.draft_request(drafter) {
            Some(request) => request.drafter.propose(request.context, request.prompt_len, request.room),
            None => Ok(Draft::default()),
        }
    }

    /// What [`Sequence::draft`] asks `drafter` for, to be answered with other sequences' requests
    /// by [`crate::propose_all`]; `None` where it guesses nothing.
    pub fn draft_request<'s, 'm>(&'s self, drafter: &'s mut Drafter<'m>) -> Option<DraftRequest<'s, 'm>> {
        if self.constraint.is_some() || self.finish_reason.is_some() {
            return None;
        }
        Some(DraftRequest {
            drafter,
            context: &self.context,
            prompt_len: self.prompt_len,
            room: self.room().saturating_sub(1),
        })
    }

    /// Checks `draft` against the logits of one pass over the last token and the guesses (`rows`:
    /// `(1 + guesses) × vocab`; row j follows guess j, the last row is past every guess): keeps the
    /// guesses up to the first the model refuses, then one token of its own (where it refused, or
    /// after the last guess). `on_step` gets every token produced; returns how many (≥ 1). The
    /// sequence's cache should then keep all but the last of them.
    pub fn check_draft(
        &mut self,
        rows: &mut [f32],
        vocab: usize,
        draft: &Draft,
        mut on_step: impl FnMut(Step),
    ) -> usize {
        let mut steps = 0;
        for (j, row) in rows.chunks_exact_mut(vocab).enumerate() {
            steps += 1;
            let (step, kept) = match draft.ids.get(j) {
                Some(&guess) => self.advance_with(row, Some((guess, draft.probs.get(j)))),
                None => (self.advance(row), false),
            };
            let last = step.finish_reason.is_some() || !kept;
            on_step(step);
            if last {
                break;
            }
        }
        steps
    }

    /// The result once finished (or so far, if stopped early).
    pub fn into_generation(self) -> Generation {
        Generation {
            ids: self.context[self.prompt_len..].to_vec(),
            text: self.text.map(|t| t.text),
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
        }
    }
}

/// Decoded text of a generation in progress and how much of it was handed out.
struct TextState<'a> {
    decoder: vicuna_tokenizer::StreamDecoder<'a>,
    text: String,
    emitted: usize,
}

impl<'a> TextState<'a> {
    fn new(tokenizer: &'a Tokenizer, prompt: &[u32]) -> Self {
        TextState { decoder: tokenizer.stream_decoder_after(prompt), text: String::new(), emitted: 0 }
    }

    /// Add one token, appending newly final text to `out`; true when a stop sequence now
    /// appears (the text is then cut before it).
    fn push(&mut self, id: u32, stop: &[String], out: &mut String) -> bool {
        let old_len = self.text.len();
        self.text.push_str(&self.decoder.push(id));
        if let Some(at) = find_stop(&self.text, stop, old_len) {
            self.text.truncate(at);
            self.emit(self.text.len(), out);
            return true;
        }
        let safe = self.text.len() - held_back(&self.text, stop);
        self.emit(safe, out);
        false
    }

    /// Hand out whatever is left (held-back stop prefixes and incomplete bytes included).
    fn finish(&mut self, reason: FinishReason, out: &mut String) {
        if reason != FinishReason::StopSequence {
            self.text.push_str(&self.decoder.flush());
            self.emit(self.text.len(), out);
        }
    }

    fn emit(&mut self, upto: usize, out: &mut String) {
        if upto > self.emitted {
            out.push_str(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }
}

/// Earliest start of any stop string in `text`, looking only where a match could be new: one
/// that ends after `old_len` (matches wholly inside older text were found before).
pub fn find_stop(text: &str, stops: &[String], old_len: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let mut from = old_len.saturating_sub(s.len() - 1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|i| from + i)
        })
        .min()
}

/// Length of the longest suffix of `text` that is the beginning of some stop string: that much
/// must wait, since the next token may complete the stop.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .map(|s| {
            (1..s.len().min(text.len() + 1))
                .rev()
                .find(|&n| s.is_char_boundary(n) && text.ends_with(&s[..n]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_found_across_the_boundary_of_old_text() {
        let s = stops(&["###"]);
        assert_eq!(find_stop("Hi ##", &s, 0), None);
        assert_eq!(find_stop("Hi ###", &s, 5), Some(3));
        assert_eq!(find_stop("Hi ### x ###", &s, 12), None, "old matches are not rescanned");
    }

    #[test]
    fn possible_stop_prefixes_are_held_back() {
        let s = stops(&["### Human:", "\n\n"]);
        assert_eq!(held_back("Sure.\n", &s), 1);
        assert_eq!(held_back("Sure ### Hu", &s), 6);
        assert_eq!(held_back("Sure", &s), 0);
        assert_eq!(held_back("é", &stops(&["éa"])), 2);
    }
}
