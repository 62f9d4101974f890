//! From request parameters to a [`ValidRequest`], with TGI's rules and defaults. Every route goes
//! through here: the OpenAI routes translate their fields into [`GenerateParameters`] first, as TGI
//! does.

use serde::Deserialize;
use vicuna_engine::{random_seed, GenerationConfig, Grammar, GrammarSpec, SamplingParams};
use vicuna_tokenizer::Tokenizer;

use crate::adapters::NamedLora;

/// TGI's `parameters` object. Every field may be absent or null (clients such as
/// `huggingface_hub` send nulls for what they leave unset). The fields marked `serde(skip)` are
/// not TGI's: the OpenAI routes set them when they translate their requests.
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
    /// The LoRA adapter to run (TGI's field; the OpenAI routes put their `model` here): an adapter's name, or the
    /// base model's (or none) for the base.
    pub adapter_id: Option<String>,
    /// OpenAI's `presence_penalty`.
    #[serde(skip)]
    pub presence_penalty: Option<f32>,
    /// OpenAI's `logit_bias`, as (token id, bias).
    #[serde(skip)]
    pub logit_bias: Vec<(u32, f32)>,
    /// OpenAI's `n`: choices returned (of `best_of` generated).
    #[serde(skip)]
    pub n: Option<u32>,
    /// vLLM's `min_tokens`: EOS cannot be chosen before this many tokens.
    #[serde(skip)]
    pub min_new_tokens: Option<u32>,
    /// vLLM's `ignore_eos`.
    #[serde(skip)]
    pub ignore_eos: Option<bool>,
    /// A prompt given as token ids (OpenAI completions), used as given instead of tokenizing
    /// `inputs` (which then holds their text, for `echo`).
    #[serde(skip)]
    pub prompt_ids: Option<Vec<u32>>,
    /// Structured output the OpenAI routes ask for (`response_format`, llama.cpp's `json_schema` /
    /// `grammar`); TGI's own is `grammar`.
    #[serde(skip)]
    pub grammar_spec: Option<GrammarSpec>,
}

/// TGI's `grammar`: `{"type": "json", "value": SCHEMA}` (the schema as an object or as JSON text),
/// `{"type": "regex", "value": REGEX}`, `{"type": "json_schema", "value": {"schema": SCHEMA}}`
/// (TGI's form of OpenAI's), and here also `{"type": "lark", "value": GRAMMAR}`.
pub fn tgi_grammar(value: &serde_json::Value) -> Result<GrammarSpec, String> {
    let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let inner = value.get("value").filter(|v| !v.is_null());
    let text = |what: &str| -> Result<String, String> {
        inner
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("`grammar.value` must be the {what} as a string"))
    };
    match kind {
        "json" | "json_object" => match inner {
            None => Ok(GrammarSpec::JsonObject),
            Some(serde_json::Value::String(schema)) => serde_json::from_str(schema)
                .map(GrammarSpec::JsonSchema)
                .map_err(|e| format!("`grammar.value` is not a JSON schema: {e}")),
            Some(schema) => Ok(GrammarSpec::JsonSchema(schema.clone())),
        },
        "json_schema" => match inner.and_then(|v| v.get("schema")) {
            Some(schema) => Ok(GrammarSpec::JsonSchema(schema.clone())),
            None => Err("`grammar.value.schema` is missing".into()),
        },
        "regex" => text("regular expression").map(GrammarSpec::Regex),
        "lark" => text("Lark grammar").map(GrammarSpec::Lark),
        other => Err(format!("`grammar.type` must be json, json_schema, regex or lark (got `{other}`)")),
    }
}

/// A grammar as llama.cpp's `grammar` field sends it: llguidance reads Lark, not GBNF.
pub fn lark_grammar(text: &str) -> Result<GrammarSpec, String> {
    if text.contains("::=") {
        return Err("`grammar` looks like GBNF (`::=`), which is not supported: write it in Lark \
                    (`start: \"yes\" | \"no\"`), or use `response_format` / `json_schema` for JSON"
            .into());
    }
    Ok(GrammarSpec::Lark(text.to_string()))
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
    /// Most sequences one request may generate (`n`, `best_of`): each takes a place in the batch.
    pub max_choices: usize,
    /// The KV budget in blocks: the sequences of one request must fit it together.
    pub kv_blocks: usize,
}

/// Most sequences one request generates, whatever the batch allows (OpenAI caps `n` at 128; a CPU
/// runs far fewer at once).
pub const MAX_CHOICES: usize = 16;

/// Most alternatives per token (`top_logprobs`, `top_n_tokens`, completions' `logprobs`), as OpenAI.
pub const MAX_TOP_LOGPROBS: u32 = 20;

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
    /// Choices returned: the `n` best (by total log-probability) of the `best_of` generated.
    pub n: usize,
    /// Sequences generated for this prompt, each seeded `seed + i`.
    pub best_of: usize,
    /// The LoRA adapter it runs with (`None`: the base model), set from `adapter_id` by the server, which knows
    /// the adapters.
    pub lora: Option<NamedLora>,
}

/// Check `parameters` and tokenize `inputs` (with BOS): the one place where every route's
/// parameters are checked (the sampling ones by the engine's own check, as the CLI's are).
/// `internal_stops` are the route's own stop sequences (the chat template's), which do not count
/// against `max_stop_sequences`.
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
    if p.watermark == Some(true) {
        return Err("`watermark` is not supported".into());
    }
    let temperature = p.temperature.unwrap_or(1.0);
    let top_k = match p.top_k {
        None => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(format!("`top_k` must be strictly positive (got {k})")),
    };
    let top_p = p.top_p.unwrap_or(1.0);
    let typical_p = p.typical_p.unwrap_or(1.0);
    // As TGI: greedy unless sampling is asked for, or implied by a warper that changes the
    // distribution.
    let do_sample = p.do_sample.unwrap_or(false) || temperature != 1.0 || top_k > 0 || top_p < 1.0 || typical_p < 1.0;
    let sampling = SamplingParams {
        do_sample,
        temperature,
        top_k,
        top_p,
        typical_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        logit_bias: p.logit_bias.clone(),
    };
    // The engine's messages name the parameter as both APIs spell it.
    sampling.validate(tokenizer.vocab_size()).map_err(|m| format!("`{}", m.replacen(' ', "` ", 1)))?;

    let top_logprobs = p.top_n_tokens.unwrap_or(0);
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(format!("`top_n_tokens` must be at most {MAX_TOP_LOGPROBS} (got {top_logprobs})"));
    }
    let n = p.n.unwrap_or(1) as usize;
    let best_of = p.best_of.map_or(n, |b| b as usize);
    if n == 0 || best_of < n {
        return Err(format!("`best_of` ({best_of}) must be at least `n` ({n}), and `n` at least 1"));
    }
    if best_of > limits.max_choices {
        return Err(format!(
            "a request may generate at most {} sequences (`n`, `best_of`; each takes a place in the batch, \
             --max-batch-size) (got {best_of})",
            limits.max_choices
        ));
    }
    if best_of > n {
        // TGI's rules: the best of several only differs from one choice when they are sampled,
        // and which one is best is known only at the end.
        if !do_sample {
            return Err("`best_of` > 1 needs sampling: set `do_sample` or a `temperature`".into());
        }
        if stream {
            return Err("`best_of` > 1 is not supported when streaming tokens".into());
        }
    }
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
    if user_stops.iter().any(String::is_empty) {
        return Err("`stop` sequences cannot be empty strings".into());
    }
    let prompt_logprobs = p.decoder_input_details.unwrap_or(false);
    if prompt_logprobs && stream {
        return Err("`decoder_input_details` is not supported when streaming tokens".into());
    }
    if inputs.is_empty() && p.prompt_ids.is_none() {
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

    let mut prompt = match &p.prompt_ids {
        None => tokenizer.encode(inputs, true),
        Some(ids) => {
            let vocab = tokenizer.vocab_size();
            if ids.is_empty() {
                return Err("`prompt` cannot be an empty list of token ids".into());
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(format!("`prompt`: token id {bad} is not in the vocabulary (ids 0..{vocab})"));
            }
            ids.clone()
        }
    };
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
    let min_new_tokens = p.min_new_tokens.unwrap_or(0) as usize;
    if min_new_tokens > max_new_tokens {
        return Err(format!("`min_tokens` {min_new_tokens} exceeds `max_tokens` {max_new_tokens}"));
    }
    let blocks = crate::scheduler::blocks_needed(prompt.len(), max_new_tokens, best_of, 0);
    if blocks > limits.kv_blocks {
        return Err(format!(
            "{best_of} sequences of {} prompt + {max_new_tokens} new tokens need {blocks} KV blocks, more than the \
             budget of {} (--max-batch-total-tokens); ask for fewer sequences or tokens",
            prompt.len(),
            limits.kv_blocks
        ));
    }

    let grammar_spec = match (&p.grammar_spec, p.grammar.as_ref().filter(|g| !g.is_null())) {
        (Some(spec), _) => Some(spec.clone()),
        (None, Some(tgi)) => Some(tgi_grammar(tgi)?),
        (None, None) => None,
    };
    let grammar = match grammar_spec {
        Some(_) if p.ignore_eos == Some(true) => {
            return Err("`ignore_eos` cannot go with structured output: the grammar ends the text".into())
        }
        Some(spec) => Some(Grammar::compile(tokenizer, &spec)?),
        None => None,
    };

    let mut stop = user_stops;
    if grammar.is_none() {
        // The template's stops end a free reply; a grammar ends its own (and its text may hold them, e.g. "###"
        // inside a JSON string).
        stop.extend(internal_stops.iter().map(|s| s.to_string()));
    }
    Ok(ValidRequest {
        prompt,
        config: GenerationConfig {
            sampling,
            max_new_tokens,
            min_new_tokens,
            stop,
            ignore_eos: p.ignore_eos.unwrap_or(false),
            seed: p.seed.unwrap_or_else(random_seed),
            top_logprobs: top_logprobs as usize,
            grammar,
        },
        details: p.details.unwrap_or(false),
        prompt_logprobs,
        return_full_text: p.return_full_text.unwrap_or(false),
        lora: None,
        n,
        best_of,
    })
}
