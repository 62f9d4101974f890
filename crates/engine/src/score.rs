//! Teacher-forced scoring: how likely the model finds each token given the ones before it.

use vicuna_model::{QuantLlama, Result};

pub struct Score {
    /// `log p(ids[i] | ids[..i])`; None for the first token, which has no prefix.
    pub logprobs: Vec<Option<f64>>,
    /// `exp(-mean logprob)` over the scored tokens; None when only one token was given.
    pub perplexity: Option<f64>,
    /// The whole logits vector at the last position (what comes next).
    pub last_logits: Vec<f32>,
}

pub fn score(model: &QuantLlama, ids: &[u32]) -> Result<Score> {
    model.check_ids(ids)?;
    let logits = model.forward_all(ids, &mut model.new_cache())?;
    let rows: Vec<&[f32]> = logits.chunks_exact(model.config().vocab_size).collect();
    let mut logprobs = vec![None];
    for (row, &next) in rows.iter().zip(&ids[1..]) {
        logprobs.push(Some(log_softmax_at(row, next as usize)));
    }
    let scored: Vec<f64> = logprobs.iter().flatten().copied().collect();
    let perplexity = (!scored.is_empty()).then(|| (-scored.iter().sum::<f64>() / scored.len() as f64).exp());
    let last_logits = rows.last().map(|r| r.to_vec()).unwrap_or_default();
    Ok(Score { logprobs, perplexity, last_logits })
}

/// `log softmax(row)[index]`.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let (max, log_sum) = log_normalizer(row);
    (row[index] - max) as f64 - log_sum
}

/// The row's maximum and `ln Σ exp(l − max)`, so that `log softmax(row)[i] = (row[i] − max) − log_sum`: f32
/// exponentials (fast, and exact to ~1e-7 relative after the max is subtracted) summed in f64.
pub(crate) fn log_normalizer(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = row.iter().map(|&l| (l - max).exp() as f64).sum::<f64>().ln();
    (max, log_sum)
}
