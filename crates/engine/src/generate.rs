//! The generation loop: prefill the prompt, then one token at a time through the KV cache, with
//! EOS, min/max new tokens and stop sequences decided the way transformers and TGI decide them.

use vicuna_model::{KvCache, Llama, Result};
use vicuna_tokenizer::Tokenizer;

use crate::sampling::{Sampler, SamplingParams};

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
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    model.check_ids(prompt)?;
    let eos = tokenizer.map_or(model.config.eos_token_id, |t| t.eos_id());
    let mut sampler = Sampler::new(config.sampling.clone(), config.seed);
    let mut cache = KvCache::new(&model.config);
    let mut text = tokenizer.map(|t| TextState::new(t, prompt, &config.stop));
    let mut context = prompt.to_vec();
    let mut ids = Vec::new();
    let context_limit = model.config.max_position_embeddings;

    let mut logits = model.next_token_logits(prompt, &mut cache)?;
    let finish_reason = loop {
        if ids.len() >= config.max_new_tokens || context.len() >= context_limit {
            break FinishReason::Length;
        }
        let ban: &[u32] = if ids.len() < config.min_new_tokens { &[eos] } else { &[] };
        let id = sampler.sample(&mut logits, &context, ban);
        ids.push(id);
        context.push(id);
        if id == eos && !config.ignore_eos {
            break FinishReason::EosToken;
        }
        if let Some(state) = text.as_mut() {
            if state.push(id, &mut on_text) {
                break FinishReason::StopSequence;
            }
        }
        if ids.len() < config.max_new_tokens && context.len() < context_limit {
            logits = model.next_token_logits(&[id], &mut cache)?;
        }
    };
    let text = text.map(|state| state.finish(finish_reason, &mut on_text));
    Ok(Generation { ids, text, finish_reason })
}

/// Decoded text of a generation in progress and how much of it was handed out.
struct TextState<'a> {
    decoder: vicuna_tokenizer::StreamDecoder<'a>,
    stop: &'a [String],
    text: String,
    emitted: usize,
}

impl<'a> TextState<'a> {
    fn new(tokenizer: &'a Tokenizer, prompt: &[u32], stop: &'a [String]) -> Self {
        TextState { decoder: tokenizer.stream_decoder_after(prompt), stop, text: String::new(), emitted: 0 }
    }

    /// Add one token; true when a stop sequence now appears (the text is then cut before it).
    fn push(&mut self, id: u32, on_text: &mut impl FnMut(&str)) -> bool {
        let old_len = self.text.len();
        self.text.push_str(&self.decoder.push(id));
        if let Some(at) = find_stop(&self.text, self.stop, old_len) {
            self.text.truncate(at);
            self.emit(self.text.len(), on_text);
            return true;
        }
        let safe = self.text.len() - held_back(&self.text, self.stop);
        self.emit(safe, on_text);
        false
    }

    fn finish(mut self, reason: FinishReason, on_text: &mut impl FnMut(&str)) -> String {
        if reason != FinishReason::StopSequence {
            self.text.push_str(&self.decoder.flush());
            self.emit(self.text.len(), on_text);
        }
        self.text
    }

    fn emit(&mut self, upto: usize, on_text: &mut impl FnMut(&str)) {
        if upto > self.emitted {
            on_text(&self.text[self.emitted..upto]);
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
