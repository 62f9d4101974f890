//! Supervised fine-tuning: next-token loss on the assistant's tokens only, AdamW, linear warmup
//! then cosine decay, gradient-norm clipping, gradient accumulation; full weights or LoRA.

use vicuna_engine::Rng;
use vicuna_tokenizer::Tokenizer;

use crate::data::{tokenize_conversation, Conversation, TokenizedExample};
use crate::error::{bail, Result};
use crate::lm::{lm_batch, mean_nll, summed_nll};
use crate::optim::{accumulate, clip_scale, cosine_with_warmup, grad_norm, gradients, AdamW, AdamWParams};
use crate::params::TrainableLlama;

#[derive(Clone, Debug)]
pub struct SftOptions {
    pub epochs: usize,
    pub lr: f64,
    /// The learning rate the cosine decays to.
    pub min_lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub warmup_steps: usize,
    pub seed: u64,
    pub adamw: AdamWParams,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Share of the examples held out to measure the loss before and after (0: none).
    pub eval_fraction: f64,
}

impl Default for SftOptions {
    fn default() -> Self {
        SftOptions {
            epochs: 1,
            lr: 2e-5,
            min_lr: 0.0,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            warmup_steps: 0,
            seed: 0,
            adamw: AdamWParams::default(),
            max_grad_norm: 1.0,
            eval_fraction: 0.05,
        }
    }
}

/// One optimizer step, for progress logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SftStep {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SftReport {
    pub steps: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    /// Conversations dropped because no assistant token survived truncation.
    pub dropped_examples: usize,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    /// Real (unpadded) tokens of every training step, for throughput figures.
    pub train_tokens: usize,
}

/// In-place Fisher–Yates shuffle driven by the engine's seeded generator.
pub fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Tokenize, drop examples with nothing to learn, split off the held-out share.
pub fn prepare_examples(
    tokenizer: &Tokenizer,
    conversations: &[Conversation],
    max_seq_len: usize,
    eval_fraction: f64,
    seed: u64,
) -> (Vec<TokenizedExample>, Vec<TokenizedExample>, usize) {
    let mut examples: Vec<TokenizedExample> =
        conversations.iter().map(|c| tokenize_conversation(tokenizer, c, max_seq_len)).collect();
    let before = examples.len();
    examples.retain(|e| e.ids.len() >= 2 && e.loss_mask[1..].iter().any(|&m| m));
    let dropped = before - examples.len();
    shuffle(&mut examples, &mut Rng::new(seed ^ 0x5EED_E7A1));
    let n_eval = if eval_fraction > 0.0 {
        ((examples.len() as f64 * eval_fraction).ceil() as usize).min(examples.len() / 2)
    } else {
        0
    };
    let train = examples.split_off(n_eval);
    (train, examples, dropped)
}

pub fn pad_id(tokenizer: &Tokenizer) -> u32 {
    tokenizer.pad_id().unwrap_or(tokenizer.eos_id())
}

/// Train `model` on the conversations; `on_step` sees every optimizer step.
pub fn train_sft(
    model: &TrainableLlama,
    tokenizer: &Tokenizer,
    conversations: &[Conversation],
    opts: &SftOptions,
    mut on_step: impl FnMut(&SftStep),
) -> Result<SftReport> {
    if opts.batch_size == 0 || opts.grad_accum == 0 || opts.epochs == 0 {
        bail!("--batch-size, --grad-accum and --epochs must be at least 1");
    }
    let (train, eval, dropped) =
        prepare_examples(tokenizer, conversations, opts.max_seq_len, opts.eval_fraction, opts.seed);
    if train.is_empty() {
        bail!("no training example has an assistant token within --max-seq-len {}", opts.max_seq_len);
    }
    let pad = pad_id(tokenizer);
    let eval_loss = |m: &TrainableLlama| -> Result<Option<f64>> {
        if eval.is_empty() {
            return Ok(None);
        }
        Ok(Some(mean_nll(&m.frozen_model()?, &eval, opts.batch_size, pad)?))
    };
    let eval_loss_before = eval_loss(model)?;

    let named_vars = model.vars();
    let vars: Vec<_> = named_vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(&vars, opts.adamw)?;
    let per_step = opts.batch_size * opts.grad_accum;
    let steps_per_epoch = train.len().div_ceil(per_step);
    let total_steps = steps_per_epoch * opts.epochs;
    let mut rng = Rng::new(opts.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut step = 0;
    let mut train_tokens = 0;
    for epoch in 0..opts.epochs {
        shuffle(&mut order, &mut rng);
        for group in order.chunks(per_step) {
            let lr = cosine_with_warmup(step, total_steps, opts.warmup_steps, opts.lr, opts.min_lr);
            let micro: Vec<Vec<&TokenizedExample>> =
                group.chunks(opts.batch_size).map(|c| c.iter().map(|&i| &train[i]).collect()).collect();
            let batches = micro.iter().map(|m| lm_batch(m, pad, model.device())).collect::<Result<Vec<_>>>()?;
            let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
            train_tokens += micro.iter().flatten().map(|e| e.ids.len()).sum::<usize>();
            let lm = model.model()?;
            let mut grads = None;
            let mut loss_sum = 0.0;
            for batch in &batches {
                let loss = (summed_nll(&lm, batch)? / n_targets as f64)?;
                loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                accumulate(&mut grads, gradients(&loss.backward()?, &vars)?)?;
            }
            let grads = grads.expect("a step has at least one micro-batch");
            // Clipping is a factor the fused update applies (no scaled copy of the gradients).
            let grad_norm = grad_norm(&grads)?;
            optimizer.step_scaled(&vars, &grads, lr, clip_scale(grad_norm, opts.max_grad_norm))?;
            on_step(&SftStep { step, epoch, loss: loss_sum, lr, grad_norm });
            step += 1;
        }
    }
    Ok(SftReport {
        steps: step,
        train_examples: train.len(),
        eval_examples: eval.len(),
        dropped_examples: dropped,
        eval_loss_before,
        eval_loss_after: eval_loss(model)?,
        train_tokens,
    })
}
