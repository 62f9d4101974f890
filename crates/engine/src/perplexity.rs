//! Perplexity over a long text and the KL divergence of a model from a reference, measured the way llama.cpp's
//! `llama-perplexity` measures them, so that figures can be set side by side:
//!
//! - the tokens are cut into chunks of `ctx`; each chunk starts with BOS in place of its first token and is
//!   evaluated from an empty cache;
//! - only the second half of each chunk is scored (the first half is context): the logits at positions
//!   `ctx/2 ..= ctx-2` predict the tokens at `ctx/2+1 ..= ctx-1`;
//! - perplexity is `exp(mean negative log-likelihood)` over every scored token; with a reference, each scored
//!   position also gives `KL(reference ‖ model)` over the whole vocabulary and whether both rank the same token
//!   first.
//!
//! The reference's log-probabilities are computed first and kept ([`ChunkLogProbs`]), so only one model needs to
//! be in memory at a time.

use vicuna_model::{Error, QuantLlama, Result};

use crate::argmax;
use crate::score::log_normalizer;

/// The chunks of `tokens` that get evaluated: every whole `ctx` tokens (a short tail is left out, as llama.cpp
/// does), each with `bos` in place of its first token.
pub fn perplexity_chunks(tokens: &[u32], ctx: usize, bos: u32) -> Result<Vec<Vec<u32>>> {
    if ctx < 4 {
        return Err(Error::msg(format!("--ctx {ctx} is too small: give at least 4 tokens per chunk")));
    }
    if tokens.len() < ctx {
        return Err(Error::msg(format!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}: give a longer text or a smaller --ctx",
            tokens.len()
        )));
    }
    Ok(tokens
        .chunks_exact(ctx)
        .map(|chunk| {
            let mut chunk = chunk.to_vec();
            chunk[0] = bos;
            chunk
        })
        .collect())
}

/// The log-softmax rows of one chunk's scored positions, `rows × vocab`, and the tokens they predict.
pub struct ChunkLogProbs {
    pub vocab: usize,
    pub log_probs: Vec<f32>,
    pub targets: Vec<u32>,
}

impl ChunkLogProbs {
    /// Evaluates `chunk` from an empty cache and keeps the scored half.
    pub fn compute(model: &QuantLlama, chunk: &[u32]) -> Result<ChunkLogProbs> {
        let vocab = model.config().vocab_size;
        let first = chunk.len() / 2;
        let logits = model.forward_all(chunk, &mut model.new_cache())?;
        let mut log_probs = logits[first * vocab..(chunk.len() - 1) * vocab].to_vec();
        log_probs.chunks_exact_mut(vocab).for_each(log_softmax);
        Ok(ChunkLogProbs { vocab, log_probs, targets: chunk[first + 1..].to_vec() })
    }

    fn rows(&self) -> impl Iterator<Item = (&[f32], u32)> {
        self.log_probs.chunks_exact(self.vocab).zip(self.targets.iter().copied())
    }
}

/// Running totals over the scored tokens of a model (and, with a reference, of their divergence).
#[derive(Clone, Debug, Default)]
pub struct PerplexityStats {
    pub tokens: usize,
    nll_sum: f64,
    nll_sq_sum: f64,
    reference_nll_sum: f64,
    kld_sum: f64,
    kld_sq_sum: f64,
    kld_max: f64,
    same_top1: usize,
    compared: usize,
}

impl PerplexityStats {
    /// Adds a chunk of the model, and the same chunk of the reference model when comparing.
    pub fn add(&mut self, model: &ChunkLogProbs, reference: Option<&ChunkLogProbs>) -> Result<()> {
        if let Some(reference) = reference {
            if reference.vocab != model.vocab || reference.targets != model.targets {
                return Err(Error::msg(format!(
                    "the reference model has a vocabulary of {} and the model {}: compare models of one vocabulary",
                    reference.vocab, model.vocab
                )));
            }
        }
        for (i, (row, target)) in model.rows().enumerate() {
            let nll = -f64::from(row[target as usize]);
            self.tokens += 1;
            self.nll_sum += nll;
            self.nll_sq_sum += nll * nll;
            if let Some(reference) = reference {
                let reference_row = &reference.log_probs[i * reference.vocab..(i + 1) * reference.vocab];
                self.reference_nll_sum -= f64::from(reference_row[target as usize]);
                let kld = kl_divergence(reference_row, row);
                self.kld_sum += kld;
                self.kld_sq_sum += kld * kld;
                self.kld_max = self.kld_max.max(kld);
                self.same_top1 += usize::from(argmax(reference_row) == argmax(row));
                self.compared += 1;
            }
        }
        Ok(())
    }

    /// `exp(mean negative log-likelihood)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.tokens.max(1) as f64).exp()
    }

    /// The standard error of the perplexity (llama.cpp's "± …": the error of the mean NLL carried through `exp`).
    pub fn perplexity_error(&self) -> f64 {
        self.perplexity() * standard_error(self.nll_sum, self.nll_sq_sum, self.tokens)
    }

    /// The comparison with the reference, when there was one.
    pub fn divergence(&self) -> Option<Divergence> {
        (self.compared > 0).then(|| Divergence {
            reference_perplexity: (self.reference_nll_sum / self.compared as f64).exp(),
            mean_kld: self.kld_sum / self.compared as f64,
            mean_kld_error: standard_error(self.kld_sum, self.kld_sq_sum, self.compared),
            max_kld: self.kld_max,
            top1_agreement: self.same_top1 as f64 / self.compared as f64,
        })
    }
}

/// How far a model's predictions are from the reference's, over the scored tokens.
#[derive(Clone, Copy, Debug)]
pub struct Divergence {
    pub reference_perplexity: f64,
    /// Mean of `KL(reference ‖ model)` in nats, and its standard error.
    pub mean_kld: f64,
    pub mean_kld_error: f64,
    pub max_kld: f64,
    /// The fraction of positions where both models rank the same token first.
    pub top1_agreement: f64,
}

/// `KL(p ‖ q) = Σ p (log p − log q)` of two log-probability rows, in nats.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p.iter().zip(log_q).map(|(&lp, &lq)| f64::from(lp).exp() * (f64::from(lp) - f64::from(lq))).sum()
}

/// Turns a row of logits into log-probabilities, in place.
pub fn log_softmax(row: &mut [f32]) {
    let (max, log_sum) = log_normalizer(row);
    row.iter_mut().for_each(|l| *l = (f64::from(*l - max) - log_sum) as f32);
}

/// Standard error of the mean of `n` values with this sum and sum of squares.
fn standard_error(sum: f64, sq_sum: f64, n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let n = n as f64;
    let mean = sum / n;
    ((sq_sum / n - mean * mean).max(0.0) / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_replace_the_first_token_and_drop_the_tail() {
        let tokens: Vec<u32> = (10..31).collect();
        let chunks = perplexity_chunks(&tokens, 8, 1).unwrap();
        assert_eq!(chunks, vec![vec![1, 11, 12, 13, 14, 15, 16, 17], vec![1, 19, 20, 21, 22, 23, 24, 25]]);
        assert!(perplexity_chunks(&tokens[..7], 8, 1).is_err());
    }

    #[test]
    fn kl_divergence_of_known_distributions() {
        let mut p = [0.5f32.ln(), 0.5f32.ln()];
        let q = [0.9f32.ln(), 0.1f32.ln()];
        let want = 0.5 * (0.5f64 / 0.9).ln() + 0.5 * (0.5f64 / 0.1).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-6);
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        let mut logits = [1.0f32, 1.0];
        log_softmax(&mut logits);
        p.iter_mut().zip(logits).for_each(|(a, b)| assert!((*a - b).abs() < 1e-7));
    }
}
