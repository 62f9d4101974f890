//! Shared by the request targets: the tokenizer and limits they validate with, and the bounds every
//! accepted request must satisfy (crates/server/src/validation.rs documents them).

use std::path::Path;
use std::sync::OnceLock;
use vicuna_server::fuzzing::{validate_body, Accepted, Route};
use vicuna_server::validation::{Limits, MAX_TOP_LOGPROBS};
use vicuna_tokenizer::Tokenizer;

/// LLaMA's tokenizer, from the repository's fixture.
pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let bytes = include_bytes!("../../tests/fixtures/tokenizer/tokenizer.model");
        Tokenizer::from_bytes(Path::new("tokenizer.model"), bytes).expect("the fixture loads")
    })
}

/// Small limits, so that requests past them are easy to reach.
pub const LIMITS: Limits = Limits {
    max_input_bytes: 8192,
    max_input_tokens: 1024,
    max_total_tokens: 2048,
    max_stop_sequences: 4,
    max_choices: 4,
    kv_blocks: 256,
};

/// Validates `body` for `route`; when accepted, asserts the documented bounds.
pub fn check(route: Route, body: &[u8]) -> Option<Accepted> {
    let tokenizer = tokenizer();
    let accepted = validate_body(route, body, tokenizer, &LIMITS).ok()?;
    let Accepted { valid, stream, internal_stops } = &accepted;
    let c = &valid.config;
    let vocab = tokenizer.vocab_size();
    assert!(!valid.prompt.is_empty() && valid.prompt.len() <= LIMITS.max_input_tokens, "{valid:?}");
    assert!(valid.prompt.iter().all(|&id| (id as usize) < vocab), "{valid:?}");
    assert!(c.max_new_tokens >= 1 && valid.prompt.len() + c.max_new_tokens <= LIMITS.max_total_tokens, "{valid:?}");
    assert!(c.min_new_tokens <= c.max_new_tokens, "{valid:?}");
    assert!(1 <= valid.n && valid.n <= valid.best_of && valid.best_of <= LIMITS.max_choices, "{valid:?}");
    if valid.best_of > valid.n {
        assert!(c.sampling.do_sample && !stream, "{valid:?}");
    }
    assert!(c.stop.len() <= LIMITS.max_stop_sequences + internal_stops, "{valid:?}");
    assert!(c.stop.iter().all(|s| !s.is_empty()), "{valid:?}");
    assert!(c.top_logprobs <= MAX_TOP_LOGPROBS as usize, "{valid:?}");
    assert!(!(valid.prompt_logprobs && *stream), "{valid:?}");
    assert!(!(c.ignore_eos && c.grammar.is_some()), "{valid:?}");
    c.sampling.validate(vocab).expect("accepted sampling parameters pass the engine's own check");
    assert!(c.sampling.logit_bias.iter().all(|&(id, _)| (id as usize) < vocab), "{valid:?}");
    Some(accepted)
}
