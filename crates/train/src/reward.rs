//! The reward model: a LLaMA trunk and a scalar head read at each sequence's last real token,
//! trained with the pairwise loss `−log σ(r_chosen − r_rejected)`.
//!
//! Saved like transformers' `LlamaForSequenceClassification` with one label: `config.json` with
//! that architecture, and `model.safetensors` holding the `model.*` trunk tensors plus
//! `score.weight` `[1, hidden]` (no bias, no lm_head).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use vicuna_engine::Rng;
use vicuna_model::Llama;
use vicuna_tokenizer::Tokenizer;
use vicuna_weights::{Checkpoint, LlamaConfig};

use crate::data::{render, Conversation, Preference};
use crate::error::{bail, Error, Result};
use crate::io::write_safetensors_atomic;
use crate::lm::pad_right;
use crate::optim::{clip_grad_norm, cosine_with_warmup, gradients, AdamW, AdamWParams};
use crate::params::{write_config, LoraSpec, TrainableLlama};
use crate::ppo_math::pairwise_loss;
use crate::sft::{pad_id, shuffle};

/// Name of the head's weight, as in `LlamaForSequenceClassification`.
pub const SCORE_WEIGHT: &str = "score.weight";
const LM_HEAD: &str = "lm_head.weight";

pub struct RewardModel {
    pub trunk: TrainableLlama,
    /// `[1, hidden]`
    pub score: Var,
}

impl RewardModel {
    /// A new reward model on a causal LM's trunk; the head starts small and random
    /// (normal-ish, std 0.02 like transformers' `initializer_range`, drawn from `seed`).
    pub fn from_causal_lm(dir: &Path, lora: Option<LoraSpec>, seed: u64, device: &Device) -> Result<Self> {
        let trunk = TrainableLlama::load(dir, lora, seed, device)?;
        let mut rng = Rng::new(seed ^ 0x5C0E);
        let h = trunk.config.hidden_size;
        // Sum of 12 uniforms − 6: a cheap, deterministic normal sample.
        let w: Vec<f32> = (0..h).map(|_| ((0..12).map(|_| rng.next_f64()).sum::<f64>() - 6.0) as f32 * 0.02).collect();
        let score = Var::from_tensor(&Tensor::from_vec(w, (1, h), device)?)?;
        Ok(RewardModel { trunk, score })
    }

    /// Load a saved reward model folder (every weight trainable), checked like any model folder:
    /// every trunk tensor and `score.weight` `[1, hidden]` with its shape, nothing else.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        if checkpoint.info(SCORE_WEIGHT).is_none() {
            bail!("{}: no tensor {SCORE_WEIGHT}, so no reward model (`vicuna train rm` makes one)", dir.display());
        }
        checkpoint.check_against_score_head(&config, 1)?;
        let read = |name: &str| -> Result<Tensor> {
            let shape = checkpoint.info(name).map(|info| info.shape.clone()).unwrap_or_default();
            Ok(Tensor::from_vec(checkpoint.to_f32(name)?, shape, device)?)
        };
        let score = read(SCORE_WEIGHT)?;
        let mut weights = HashMap::new();
        for (name, _) in config.expected_shapes() {
            if name != LM_HEAD {
                weights.insert(name.clone(), read(&name)?);
            }
        }
        // The head is never used; the trunk API wants one, so the embedding stands in.
        if !config.tie_word_embeddings {
            let embed = weights["model.embed_tokens.weight"].clone();
            weights.insert(LM_HEAD.to_string(), embed);
        }
        let trunk = TrainableLlama::from_weights(config, weights, None, 0, device)?;
        Ok(RewardModel { trunk, score: Var::from_tensor(&score)? })
    }

    /// The variables training updates (the unused lm_head is left out).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self.trunk.vars().into_iter().filter(|(n, _)| n != LM_HEAD).collect();
        vars.push((SCORE_WEIGHT.to_string(), self.score.clone()));
        vars
    }

    /// Rewards `[batch]` of right-padded `ids` whose real lengths are `lengths`, with gradients.
    pub fn rewards(&self, trunk: &Llama, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = trunk.forward_hidden(ids, None)?;
        let (b, s, h) = hidden.dims3()?;
        let last: Vec<u32> = lengths.iter().enumerate().map(|(i, &len)| (i * s + len - 1) as u32).collect();
        let index = Tensor::from_vec(last, b, ids.device())?;
        let picked = hidden.reshape((b * s, h))?.index_select(&index, 0)?;
        Ok(picked.matmul(&self.score.as_tensor().t()?)?.squeeze(1)?)
    }

    /// Scores of token sequences, without gradients, in batches.
    pub fn score_ids(&self, sequences: &[Vec<u32>], batch_size: usize, pad: u32) -> Result<Vec<f64>> {
        let trunk = self.trunk.frozen_model()?;
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch_size.max(1)) {
            let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let padded = pad_right(&rows, pad, self.trunk.device())?;
            let r = self.rewards(&trunk, &padded.ids, &padded.lengths)?.detach();
            out.extend(r.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(out)
    }

    /// Write the folder: config.json as `LlamaForSequenceClassification`, the trunk with any LoRA
    /// merged, and `score.weight`.
    pub fn save(&self, out: &Path, source_config: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::new(format!("cannot create {}: {e}", out.display())))?;
        let overrides = serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"],
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
        });
        write_config(source_config, &out.join("config.json"), Some(&overrides))?;
        let mut weights: Vec<(String, Tensor)> =
            self.trunk.merged_weights()?.into_iter().filter(|(n, _)| n != LM_HEAD).collect();
        weights.push((SCORE_WEIGHT.to_string(), self.score.as_detached_tensor()));
        write_safetensors_atomic(&out.join("model.safetensors"), &weights)
    }
}

/// Token ids the reward model reads for a conversation: BOS + rendered text, cut from the left
/// (after BOS) to `max_len` so the compared answers at the end always stay.
pub fn reward_input(tokenizer: &Tokenizer, conversation: &Conversation, max_len: usize) -> Vec<u32> {
    clip_left(tokenizer.encode(&render(conversation), true), max_len)
}

/// Ids of already-rendered text, cut the same way.
pub fn reward_input_text(tokenizer: &Tokenizer, text: &str, max_len: usize) -> Vec<u32> {
    clip_left(tokenizer.encode(text, true), max_len)
}

fn clip_left(mut ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len && max_len >= 2 {
        let cut = ids.len() - (max_len - 1);
        ids.drain(1..1 + cut);
    }
    ids
}

#[derive(Clone, Debug)]
pub struct RmOptions {
    pub epochs: usize,
    pub lr: f64,
    pub min_lr: f64,
    /// Pairs per step.
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub warmup_steps: usize,
    pub seed: u64,
    pub adamw: AdamWParams,
    pub max_grad_norm: f64,
    pub eval_fraction: f64,
}

impl Default for RmOptions {
    fn default() -> Self {
        RmOptions {
            epochs: 1,
            lr: 1e-5,
            min_lr: 0.0,
            batch_size: 4,
            max_seq_len: 512,
            warmup_steps: 0,
            seed: 0,
            adamw: AdamWParams::default(),
            max_grad_norm: 1.0,
            eval_fraction: 0.1,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RmStep {
    pub step: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RmReport {
    pub steps: usize,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub eval_accuracy_before: Option<f64>,
    pub eval_accuracy_after: Option<f64>,
    pub eval_loss_after: Option<f64>,
}

struct Pair {
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

/// Held-out (loss, accuracy) of pairs.
fn evaluate(rm: &RewardModel, pairs: &[Pair], batch_size: usize, pad: u32) -> Result<(f64, f64)> {
    let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let rejected: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected.clone()).collect();
    let rc = rm.score_ids(&chosen, batch_size, pad)?;
    let rr = rm.score_ids(&rejected, batch_size, pad)?;
    let l = crate::ppo_math::pairwise_loss_f64(&rc, &rr);
    Ok((l.loss, l.accuracy))
}

pub fn train_rm(
    rm: &RewardModel,
    tokenizer: &Tokenizer,
    preferences: &[Preference],
    opts: &RmOptions,
    mut on_step: impl FnMut(&RmStep),
) -> Result<RmReport> {
    if opts.batch_size == 0 || opts.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    let mut pairs: Vec<Pair> = preferences
        .iter()
        .map(|p| Pair {
            chosen: reward_input(tokenizer, &p.chosen_conversation(), opts.max_seq_len),
            rejected: reward_input(tokenizer, &p.rejected_conversation(), opts.max_seq_len),
        })
        .collect();
    shuffle(&mut pairs, &mut Rng::new(opts.seed ^ 0x5EED_E7A1));
    let n_eval = if opts.eval_fraction > 0.0 {
        ((pairs.len() as f64 * opts.eval_fraction).ceil() as usize).min(pairs.len() / 2)
    } else {
        0
    };
    let train = pairs.split_off(n_eval);
    let eval = pairs;
    if train.is_empty() {
        bail!("no preference pairs to train on");
    }
    let pad = pad_id(tokenizer);
    let eval_accuracy_before = if eval.is_empty() { None } else { Some(evaluate(rm, &eval, opts.batch_size, pad)?.1) };

    let named = rm.vars();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(&vars, opts.adamw)?;
    let total_steps = train.len().div_ceil(opts.batch_size) * opts.epochs;
    let mut rng = Rng::new(opts.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut step = 0;
    for _ in 0..opts.epochs {
        shuffle(&mut order, &mut rng);
        for group in order.chunks(opts.batch_size) {
            let lr = cosine_with_warmup(step, total_steps, opts.warmup_steps, opts.lr, opts.min_lr);
            // One forward for the chosen rows then the rejected rows.
            let rows: Vec<&[u32]> = group
                .iter()
                .map(|&i| train[i].chosen.as_slice())
                .chain(group.iter().map(|&i| train[i].rejected.as_slice()))
                .collect();
            let padded = pad_right(&rows, pad, rm.trunk.device())?;
            let trunk = rm.trunk.model()?;
            let r = rm.rewards(&trunk, &padded.ids, &padded.lengths)?;
            let n = group.len();
            let (loss, accuracy) = pairwise_loss(&r.narrow(0, 0, n)?, &r.narrow(0, n, n)?)?;
            let mut grads = gradients(&loss.backward()?, &vars)?;
            let grad_norm = clip_grad_norm(&mut grads, opts.max_grad_norm)?;
            optimizer.step(&vars, &grads, lr)?;
            let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            on_step(&RmStep { step, loss, accuracy, lr, grad_norm });
            step += 1;
        }
    }
    let after = if eval.is_empty() { None } else { Some(evaluate(rm, &eval, opts.batch_size, pad)?) };
    Ok(RmReport {
        steps: step,
        train_pairs: train.len(),
        eval_pairs: eval.len(),
        eval_accuracy_before,
        eval_accuracy_after: after.map(|a| a.1),
        eval_loss_after: after.map(|a| a.0),
    })
}
