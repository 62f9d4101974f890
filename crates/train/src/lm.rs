//! Language-model pieces shared by SFT, the reward model and PPO: right-padded batches and
//! per-token log-probabilities with gradients.
//!
//! Batches are padded on the right, so the model's causal mask is all the masking needed: a real
//! token only ever attends to real tokens before it, and pads are left out of every loss.

use candle_core::{DType, Device, Tensor, D};
use vicuna_model::Llama;

use crate::data::TokenizedExample;
use crate::error::{bail, Result};
use crate::fused::token_logprobs;

/// Token ids `[batch, seq]` (u32, right-padded) and each row's real length.
pub struct PaddedIds {
    pub ids: Tensor,
    pub lengths: Vec<usize>,
    pub seq_len: usize,
}

pub fn pad_right(rows: &[&[u32]], pad_id: u32, device: &Device) -> Result<PaddedIds> {
    let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if seq_len == 0 {
        bail!("cannot batch empty sequences");
    }
    let mut flat = Vec::with_capacity(rows.len() * seq_len);
    for r in rows {
        flat.extend_from_slice(r);
        flat.extend(std::iter::repeat_n(pad_id, seq_len - r.len()));
    }
    Ok(PaddedIds {
        ids: Tensor::from_vec(flat, (rows.len(), seq_len), device)?,
        lengths: rows.iter().map(|r| r.len()).collect(),
        seq_len,
    })
}

/// `log softmax(logits)[target]` for `logits: [batch, seq, vocab]` and `targets: [batch, seq]`
/// (u32), with gradients; the max is detached (it cancels out of the value).
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    Ok(picked.sub(&log_sum)?.squeeze(D::Minus1)?)
}

/// A supervised batch: inputs, next-token targets and which targets count in the loss.
pub struct LmBatch {
    pub ids: Tensor,
    /// `[batch, seq − 1]`: token t + 1 of each row.
    pub targets: Tensor,
    /// `[batch, seq − 1]` f32: 1 where target t + 1 is an assistant token of the row.
    pub target_mask: Tensor,
    pub n_targets: usize,
    /// The counted targets as (row · seq + position, token): the positions whose hidden state
    /// predicts an assistant token, in row-major order.
    pub counted: Vec<(u32, u32)>,
}

pub fn lm_batch(examples: &[&TokenizedExample], pad_id: u32, device: &Device) -> Result<LmBatch> {
    let rows: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
    let padded = pad_right(&rows, pad_id, device)?;
    let s = padded.seq_len;
    if s < 2 {
        bail!("a training example needs at least two tokens");
    }
    let targets = padded.ids.narrow(1, 1, s - 1)?.contiguous()?;
    let mut mask = Vec::with_capacity(examples.len() * (s - 1));
    let mut counted = Vec::new();
    for (row, e) in examples.iter().enumerate() {
        for t in 1..s {
            let on = e.loss_mask.get(t).copied().unwrap_or(false);
            mask.push(if on { 1f32 } else { 0.0 });
            if on {
                counted.push(((row * s + t - 1) as u32, e.ids[t]));
            }
        }
    }
    let n_targets = counted.len();
    let target_mask = Tensor::from_vec(mask, (examples.len(), s - 1), device)?;
    Ok(LmBatch { ids: padded.ids, targets, target_mask, n_targets, counted })
}

/// Summed negative log-likelihood of the masked targets (divide by `n_targets` for the mean).
///
/// The same value and gradients as `gather_logprobs(model.logits(hidden))` masked and summed, but
/// only the hidden states of counted positions go through the lm_head, and the vocabulary-wide
/// product, log-softmax and gather run as one fused op (`fused::token_logprobs`).
pub fn summed_nll(model: &Llama, batch: &LmBatch) -> Result<Tensor> {
    let hidden = model.forward_hidden(&batch.ids, None)?;
    let (b, s, h) = hidden.dims3()?;
    if batch.counted.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, hidden.device())?);
    }
    let (positions, targets): (Vec<u32>, Vec<u32>) = batch.counted.iter().copied().unzip();
    let index = Tensor::from_vec(positions, batch.counted.len(), hidden.device())?;
    let states = hidden.reshape((b * s, h))?.index_select(&index, 0)?;
    let logprobs = token_logprobs(&states, &model.lm_head, &targets)?;
    Ok(logprobs.sum_all()?.neg()?)
}

/// Mean negative log-likelihood per assistant token over many examples, without gradients.
pub fn mean_nll(model: &Llama, examples: &[TokenizedExample], batch_size: usize, pad_id: u32) -> Result<f64> {
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let batch = lm_batch(&refs, pad_id, model.device())?;
        total += summed_nll(model, &batch)?.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += batch.n_targets;
    }
    Ok(total / count.max(1) as f64)
}
