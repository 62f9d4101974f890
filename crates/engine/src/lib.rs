//! Turning a model into text: sampling controls, the generation loop and grammar-constrained
//! decoding; and measuring it (scoring, perplexity, divergence from a reference).

mod constraint;
mod generate;
mod perplexity;
mod rng;
mod sampling;
mod score;
pub mod speculative;
pub mod template;
mod vocab;

pub use constraint::{Allowed, Constraint, Grammar, GrammarSpec, JSON_WHITESPACE};
pub use generate::{
    find_stop, generate, generate_in, generate_speculative, held_back, Context, FinishReason, Generation,
    GenerationConfig, Sequence, Step,
};
pub use perplexity::{kl_divergence, log_softmax, perplexity_chunks, ChunkLogProbs, Divergence, PerplexityStats};
pub use rng::{random_seed, Rng};
pub use sampling::{
    apply_presence_frequency, apply_repetition_penalty, argmax, softmax, Distribution, History, Pick, Sampler,
    SamplingParams, TokenLogprob, BAN_BIAS,
};
pub use score::{log_softmax_at, score, Score};
pub use speculative::{propose_all, Draft, DraftLimits, DraftRequest, DraftSource, Drafter};
pub use vocab::{check_tokenizer_fits, tokenizer_from_gguf, vocab_from_tokenizer};
