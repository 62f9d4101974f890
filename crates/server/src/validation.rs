//! From request parameters to a [`ValidRequest`], with TGI's rules and defaults. Every route goes
//! through here: the OpenAI routes translate their fields into [`GenerateParameters`] first, as TGI
//! does.

use serde::Deserialize;
use vicuna_engine::{random_seed, GenerationConfig, SamplingParams};
use vicuna_tokenizer::Tokenizer;

/// TGI's `parameters` object. Every field may be absent or null (clients such as
/// `huggingface_hub` send nulls for what they leave unset).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GenerateParameters {
    pub best_of: Option<u32>,
    pub temperature: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub do_sample: Option<bool>,
    pub max_new_tokens: Option<u32>,
    pub return_full_text: Option<bool>,
    pub stop: Option<Vec<String>>,
    pub truncate: Option<usize>,
    pub watermark: Option<bool>,
    pub details: Option<bool>,
    pub decoder_input_details: Option<bool>,
    pub seed: Option<u64>,
    pub top_n_tokens: Option<u32>,
    pub grammar: Option<serde_json::Value>,
    pub adapter_id: Option<String>,
}

/// The server's limits on a request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest prompt in bytes, checked before tokenizing (so a huge prompt costs no tokenizer
    /// time or memory): `--max-input-bytes`.
    pub max_input_bytes: usize,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_stop_sequences: usize,
}

/// The message for a prompt over `--max-input-bytes` (also `/tokenize`'s).
pub fn input_too_long(bytes: usize, limit: usize) -> String {
    format!("the input has {bytes} bytes but at most {limit} are allowed (--max-input-bytes); shorten it")
}

/// `max_new_tokens` when the request leaves it out.
#[derive(Clone, Copy, Debug)]
pub enum DefaultLength {
    /// This many, or what is left of `max_total_tokens` if less.
    Tokens(usize),
    /// Everything `max_total_tokens` leaves after the prompt (OpenAI's chat).
    RestOfContext,
}

/// TGI's default before it moved to "all the room left": a bounded reservation per request.
pub const TGI_DEFAULT_MAX_NEW_TOKENS: DefaultLength = DefaultLength::Tokens(100);

/// What the scheduler needs, plus how to shape the answer.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    pub details: bool,
    pub prompt_logprobs: bool,
    pub return_full_text: bool,
}

/// Check `parameters` and tokenize `inputs` (with BOS). `internal_stops` are the route's own stop
/// sequences (the chat template's), which do not count against `max_stop_sequences`.
pub fn validate(
    limits: &Limits,
    tokenizer: &Tokenizer,
    inputs: &str,
    parameters: &GenerateParameters,
    default_length: DefaultLength,
    internal_stops: &[&str],
    stream: bool,
) -> Result<ValidRequest, String> {
    if inputs.len() > limits.max_input_bytes {
        return Err(input_too_long(inputs.len(), limits.max_input_bytes));
    }
    let p = parameters;
    if p.best_of.is_some_and(|n| n > 1) {
        return Err("`best_of` > 1 is not supported; send separate requests instead".into());
    }
    if p.watermark == Some(true) {
        return Err("`watermark` is not supported".into());
    }
    if p.top_n_tokens.is_some_and(|n| n > 0) {
        return Err("`top_n_tokens` is not supported".into());
    }
    if p.grammar.as_ref().is_some_and(|g| !g.is_null()) {
        return Err("`grammar` (guided generation) is not supported".into());
    }
    if p.adapter_id.is_some() {
        return Err("`adapter_id` is not supported: this server runs one model without adapters".into());
    }
    if p.frequency_penalty.is_some_and(|f| f != 0.0) {
        return Err("`frequency_penalty` is not supported; use `repetition_penalty`".into());
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(format!("`temperature` must be strictly positive (got {temperature})"));
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(format!("`repetition_penalty` must be strictly positive (got {repetition_penalty})"));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("`top_p` must be in (0, 1] (got {top_p})"));
    }
    let typical_p = p.typical_p.unwrap_or(1.0);
    if !(typical_p > 0.0 && typical_p <= 1.0) {
        return Err(format!("`typical_p` must be in (0, 1] (got {typical_p})"));
    }
    let top_k = match p.top_k {
        None => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(format!("`top_k` must be strictly positive (got {k})")),
    };
    if p.max_new_tokens == Some(0) {
        return Err("`max_new_tokens` must be strictly positive".into());
    }
    let user_stops = p.stop.clone().unwrap_or_default();
    if user_stops.len() > limits.max_stop_sequences {
        return Err(format!(
            "`stop` takes at most {} stop sequences (got {})",
            limits.max_stop_sequences,
            user_stops.len()
        ));
    }
    let prompt_logprobs = p.decoder_input_details.unwrap_or(false);
    if prompt_logprobs && stream {
        return Err("`decoder_input_details` is not supported when streaming tokens".into());
    }
    if inputs.is_empty() {
        return Err("`inputs` cannot be empty".into());
    }
    if let Some(truncate) = p.truncate {
        if truncate == 0 || truncate > limits.max_input_tokens {
            return Err(format!(
                "`truncate` must be between 1 and {} (--max-input-tokens) (got {truncate})",
                limits.max_input_tokens
            ));
        }
    }

    let mut prompt = tokenizer.encode(inputs, true);
    if let Some(keep) = p.truncate {
        // TGI keeps the end of the input: the part closest to what comes next.
        prompt.drain(..prompt.len().saturating_sub(keep));
    }
    if prompt.len() > limits.max_input_tokens {
        return Err(format!(
            "the input has {} tokens but at most {} are allowed (--max-input-tokens); shorten it or set `truncate`",
            prompt.len(),
            limits.max_input_tokens
        ));
    }
    let room = limits.max_total_tokens - prompt.len();
    let max_new_tokens = match (p.max_new_tokens, default_length) {
        (Some(n), _) => n as usize,
        (None, DefaultLength::Tokens(n)) => n.min(room),
        (None, DefaultLength::RestOfContext) => room,
    };
    if max_new_tokens > room {
        return Err(format!(
            "the input's {} tokens plus `max_new_tokens` {max_new_tokens} exceed {} (--max-total-tokens)",
            prompt.len(),
            limits.max_total_tokens
        ));
    }

    // As TGI: greedy unless sampling is asked for, or implied by a warper that changes the
    // distribution.
    let do_sample = p.do_sample.unwrap_or(false) || temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0;
    let sampling = SamplingParams { do_sample, temperature, top_k, top_p, typical_p, repetition_penalty };
    sampling.validate()?;
    let mut stop = user_stops;
    stop.extend(internal_stops.iter().map(|s| s.to_string()));
    Ok(ValidRequest {
        prompt,
        config: GenerationConfig {
            sampling,
            max_new_tokens,
            min_new_tokens: 0,
            stop,
            ignore_eos: false,
            seed: p.seed.unwrap_or_else(random_seed),
        },
        details: p.details.unwrap_or(false),
        prompt_logprobs,
        return_full_text: p.return_full_text.unwrap_or(false),
    })
}
