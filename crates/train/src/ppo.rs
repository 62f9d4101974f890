//! PPO as trlX runs it (`AcceleratePPOTrainer`): each cycle samples `num_rollouts` responses with
//! the engine's sampler, scores them with the reward model, turns scores and the KL to the frozen
//! reference into per-token rewards, then runs `ppo_epochs` clipped updates on each minibatch of
//! `batch_size` rollouts (advantages by GAE, whitened per minibatch), updating the adaptive KL
//! coefficient after every update. The policy carries trlX's value head (Linear(h, 2h) → ReLU →
//! Linear(2h, 1) on the final normalized hidden state) and shares its trunk with it.
//!
//! Everything random is derived from the seed and a position (cycle, rollout index), so a run is
//! reproducible and a resumed run continues exactly where the checkpoint left it.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use vicuna_engine::template::append_reply;
use vicuna_engine::{GenerationConfig, Rng, Sequence};
use vicuna_model::{KvCache, Llama};
use vicuna_tokenizer::Tokenizer;

use crate::data;
use crate::error::{bail, Error, Result};
use crate::fused::token_logprobs;
use crate::io::{copy_tokenizer_files, read_safetensors, write_bytes_atomic, write_safetensors_atomic};
use crate::lm::pad_right;
use crate::optim::{clip_grad_norm, cosine_with_warmup, gradients, AdamW};
use crate::params::TrainableLlama;
use crate::ppo_config::PpoConfig;
use crate::ppo_math::{
    gae, kl_penalized_rewards, ppo_loss, response_kl, whiten, KlController, PpoLossParams, PpoLossStats,
    PpoLossTensors, ScoreStats,
};
use crate::reward::{reward_input_text, RewardModel};
use crate::sft::{pad_id, shuffle};

/// trlX's value head, with PyTorch `nn.Linear`'s initialisation U(±1/√fan_in).
pub struct ValueHead {
    /// `[2h, h]`, `[2h]`, `[1, 2h]`, `[1]` — saved as trlX's `v_head.0.*` and `v_head.2.*`.
    vars: [(String, Var); 4],
}

impl ValueHead {
    pub fn new(hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed ^ 0x7A1E);
        let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
        };
        let (h, h2) = (hidden, 2 * hidden);
        let w1 = Tensor::from_vec(uniform(h2 * h, h), (h2, h), device)?;
        let b1 = Tensor::from_vec(uniform(h2, h), h2, device)?;
        let w2 = Tensor::from_vec(uniform(h2, h2), (1, h2), device)?;
        let b2 = Tensor::from_vec(uniform(1, h2), 1, device)?;
        Ok(ValueHead {
            vars: [
                ("v_head.0.weight".into(), Var::from_tensor(&w1)?),
                ("v_head.0.bias".into(), Var::from_tensor(&b1)?),
                ("v_head.2.weight".into(), Var::from_tensor(&w2)?),
                ("v_head.2.bias".into(), Var::from_tensor(&b2)?),
            ],
        })
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.to_vec()
    }

    /// Values `[..]` for hidden states `[.., h]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let [w1, b1, w2, b2] = self.vars.each_ref().map(|(_, v)| v.as_tensor());
        let x = hidden.broadcast_matmul(&w1.t()?)?.broadcast_add(b1)?.relu()?;
        Ok(x.broadcast_matmul(&w2.t()?)?.broadcast_add(b2)?.squeeze(D::Minus1)?)
    }
}

/// One sampled response and what the rollout measured about it.
#[derive(Clone, Debug)]
pub struct Rollout {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// Policy log-probs and values of the response tokens at rollout time.
    pub logprobs: Vec<f64>,
    pub values: Vec<f64>,
    /// KL-penalised per-token rewards with the score on the last token.
    pub rewards: Vec<f64>,
    /// The reward model's raw score.
    pub score: f64,
}

/// One line of `metrics.jsonl`: a rollout-and-learn cycle.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CycleMetrics {
    pub iteration: usize,
    /// Optimizer steps done after this cycle.
    pub step: usize,
    /// Mean raw reward-model score of this cycle's rollouts (made before its updates).
    pub mean_score: f64,
    pub std_score: f64,
    /// Mean over rollouts of the estimated KL(policy ‖ reference) of the response, in nats
    /// ([`response_kl`]; trlX's `mean_kl`, with its estimator's ratio turned the right way up).
    pub mean_kl: f64,
    /// β used for this cycle's rewards, and after its updates.
    pub kl_coef: f64,
    pub kl_coef_after: f64,
    pub mean_response_len: f64,
    pub lr: f64,
    /// Means over the cycle's updates.
    pub loss: PpoLossStats,
    pub updates: usize,
}

/// What a checkpoint holds besides tensors.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct TrainerState {
    config: PpoConfig,
    iteration: usize,
    step: usize,
    kl_coef: f64,
    score_stats: ScoreStats,
    optimizer_steps: usize,
}

pub struct PpoTrainer {
    pub config: PpoConfig,
    pub policy: TrainableLlama,
    pub value_head: ValueHead,
    reference: Llama,
    reward: RewardModel,
    tokenizer: Tokenizer,
    /// The reward model folder's own tokenizer, if it has one (else the policy's).
    reward_tokenizer: Option<Tokenizer>,
    /// Rendered prompts, tokenized with BOS.
    prompts: Vec<Vec<u32>>,
    prompt_texts: Vec<String>,
    optimizer: AdamW,
    pub kl: KlController,
    score_stats: ScoreStats,
    /// Cycles done.
    pub iteration: usize,
    /// Optimizer steps done.
    pub step: usize,
}

fn load_tokenizer(dir: &Path, file: Option<&Path>) -> Result<Tokenizer> {
    if let Some(file) = file {
        return Ok(Tokenizer::from_file(file)?);
    }
    Tokenizer::from_dir(dir)?.ok_or_else(|| {
        Error::new(format!(
            "{} has no tokenizer (tokenizer.model or tokenizer.json); set tokenizer_path",
            dir.display()
        ))
    })
}

impl PpoTrainer {
    /// A fresh run.
    pub fn new(config: PpoConfig) -> Result<Self> {
        config.validate()?;
        let device = Device::Cpu;
        let tokenizer = load_tokenizer(&config.model_path, config.tokenizer_path.as_deref())?;
        let reward_tokenizer = Tokenizer::from_dir(&config.reward_model_path)?;
        let dataset = data::load(&config.prompts_path, config.skip_bad_rows)?;
        if dataset.skipped_rows > 0 {
            tracing::warn!("skipped {} bad rows of {}", dataset.skipped_rows, config.prompts_path.display());
        }
        let prompt_texts = dataset.prompts();
        if prompt_texts.is_empty() {
            bail!("{} holds no prompts", config.prompts_path.display());
        }
        let max_prompt = config.max_prompt_tokens();
        let prompts = prompt_texts
            .iter()
            .map(|p| {
                let mut ids = tokenizer.encode(p, true);
                if ids.len() > max_prompt {
                    ids.drain(1..1 + ids.len() - max_prompt); // keep BOS and the end
                }
                ids
            })
            .collect();
        let policy = TrainableLlama::load(&config.model_path, config.lora(), config.seed, &device)?;
        let value_head = ValueHead::new(policy.config.hidden_size, config.seed, &device)?;
        let reference = Llama::load(&config.model_path, &device)?;
        let reward = RewardModel::load(&config.reward_model_path, &device)?;
        let vars: Vec<Var> = Self::all_vars(&policy, &value_head).into_iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(&vars, config.adamw())?;
        let kl = KlController::new(config.init_kl_coef, config.target, config.horizon);
        Ok(PpoTrainer {
            config,
            policy,
            value_head,
            reference,
            reward,
            tokenizer,
            reward_tokenizer,
            prompts,
            prompt_texts,
            optimizer,
            kl,
            score_stats: ScoreStats::default(),
            iteration: 0,
            step: 0,
        })
    }

    /// Continue the run saved in `config.checkpoint_dir/checkpoint`. Only `epochs`,
    /// `total_steps`, `checkpoint_interval` and paths may differ from the saved settings.
    pub fn resume(config: PpoConfig) -> Result<Self> {
        let dir = config.checkpoint_dir.join("checkpoint");
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path)
            .map_err(|e| Error::new(format!("cannot resume: cannot read {} ({e})", state_path.display())))?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|e| Error::new(format!("{} is not a trainer state ({e})", state_path.display())))?;
        if !state.config.same_run_as(&config) {
            bail!(
                "cannot resume: the settings differ from the checkpoint's ({}); only epochs, total_steps, \
                 checkpoint_interval and paths may change",
                state_path.display()
            );
        }
        let mut trainer = PpoTrainer::new(config)?;
        let device = Device::Cpu;
        let policy = read_safetensors(&dir.join("policy.safetensors"), &device)?;
        trainer.policy.load_vars(&policy)?;
        let head = read_safetensors(&dir.join("value_head.safetensors"), &device)?;
        for (name, var) in trainer.value_head.vars() {
            let t = head.get(&name).ok_or_else(|| Error::new(format!("checkpoint value head has no {name}")))?;
            var.set(t)?;
        }
        let names: Vec<String> =
            Self::all_vars(&trainer.policy, &trainer.value_head).into_iter().map(|(n, _)| n).collect();
        let moments = read_safetensors(&dir.join("optimizer.safetensors"), &device)?;
        trainer.optimizer.load_state(&names, &moments, state.optimizer_steps)?;
        trainer.kl.value = state.kl_coef;
        trainer.score_stats = state.score_stats;
        trainer.iteration = state.iteration;
        trainer.step = state.step;
        Ok(trainer)
    }

    fn reward_tokenizer(&self) -> &Tokenizer {
        self.reward_tokenizer.as_ref().unwrap_or(&self.tokenizer)
    }

    fn all_vars(policy: &TrainableLlama, head: &ValueHead) -> Vec<(String, Var)> {
        let mut vars = policy.vars();
        vars.extend(head.vars());
        vars
    }

    /// Prompt `g` of the endless stream: each pass over the prompts in its own seeded order.
    fn prompt_index(&self, global: usize) -> usize {
        let n = self.prompts.len();
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, &mut Rng::new(self.config.seed ^ (0x9E37_79B9 * (global / n) as u64 + 1)));
        order[global % n]
    }

    fn generation_config(&self, global: usize, prompt_len: usize) -> GenerationConfig {
        let (max_new_tokens, min_new_tokens) = self.config.response_lengths(prompt_len);
        GenerationConfig {
            sampling: self.config.sampling(),
            max_new_tokens,
            min_new_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            seed: self.config.seed.wrapping_mul(0x100_0000_01B3).wrapping_add(global as u64),
            top_logprobs: 0,
            grammar: None,
        }
    }

    /// Sample responses to a chunk of prompts together: one ragged model step for all
    /// unfinished sequences, each with its own sampler and cache.
    fn sample_chunk(&self, model: &Llama, chunk: &[usize], first_global: usize) -> Result<Vec<(Vec<u32>, String)>> {
        let mut sequences: Vec<Sequence> = chunk
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                Sequence::new(
                    &self.prompts[p],
                    self.generation_config(first_global + k, self.prompts[p].len()),
                    Some(&self.tokenizer),
                    &model.config,
                )
            })
            .collect();
        let mut caches: Vec<KvCache> = chunk.iter().map(|_| KvCache::new(&model.config)).collect();
        let mut inputs: Vec<Vec<u32>> = chunk.iter().map(|&p| self.prompts[p].clone()).collect();
        let mut texts = vec![String::new(); chunk.len()];
        loop {
            let live: Vec<usize> = (0..chunk.len()).filter(|&i| sequences[i].finish_reason().is_none()).collect();
            if live.is_empty() {
                break;
            }
            let mut batch: Vec<(&[u32], &mut KvCache)> = Vec::with_capacity(live.len());
            let mut cache_refs: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
            for &i in &live {
                batch.push((inputs[i].as_slice(), cache_refs[i].take().expect("each cache once")));
            }
            let logits = model.forward_ragged(&mut batch)?;
            drop(batch);
            for (&i, mut row) in live.iter().zip(logits) {
                let step = sequences[i].advance(&mut row);
                texts[i].push_str(&step.text);
                inputs[i] = vec![step.id];
            }
        }
        Ok(sequences.into_iter().zip(texts).map(|(s, text)| (s.generated().to_vec(), text)).collect())
    }

    /// Log-probs `[B, T]` of each row's response tokens and, with a head, the values `[B, T]` of
    /// the states they were sampled from (trlX: `values[:, start-1 : end-1]`); `T` is the longest
    /// response, shorter rows are padded (mask 0).
    fn response_logprobs_values(
        &self,
        model: &Llama,
        head: Option<&ValueHead>,
        rows: &[(&[u32], &[u32])],
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let device = model.device();
        let full: Vec<Vec<u32>> = rows.iter().map(|(p, r)| [*p, *r].concat()).collect();
        let refs: Vec<&[u32]> = full.iter().map(Vec::as_slice).collect();
        let padded = pad_right(&refs, pad_id(&self.tokenizer), device)?;
        let hidden = model.forward_hidden(&padded.ids, None)?;
        let (b, s, h) = hidden.dims3()?;
        let t_max = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
        let (mut positions, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (p, r)) in rows.iter().enumerate() {
            for j in 0..t_max {
                let real = j < r.len();
                // The state before response token j; padding points at a real row (masked out).
                let pos = if real { p.len() + j - 1 } else { p.len() - 1 };
                positions.push((i * s + pos) as u32);
                targets.push(if real { r[j] } else { 0 });
                mask.push(if real { 1f32 } else { 0.0 });
            }
        }
        let index = Tensor::from_vec(positions, b * t_max, device)?;
        let states = hidden.reshape((b * s, h))?.index_select(&index, 0)?;
        // lm_head, log-softmax and gather fused (the logits are never stored).
        let logprobs = token_logprobs(&states, &model.lm_head, &targets)?.reshape((b, t_max))?;
        let states = states.reshape((b, t_max, h))?;
        let values = head.map(|hd| hd.forward(&states)).transpose()?;
        Ok((logprobs, values, Tensor::from_vec(mask, (b, t_max), device)?))
    }

    /// trlX `make_experience`: `num_rollouts` rollouts from the current policy, in chunks.
    fn make_experience(&mut self) -> Result<(Vec<Rollout>, f64)> {
        let policy = self.policy.frozen_model()?;
        let n = self.config.num_rollouts;
        let first = self.iteration * n;
        let mut rollouts = Vec::with_capacity(n);
        let mut kl_sum = 0.0;
        let mut start = 0;
        while start < n {
            let size = self.config.chunk_size.min(n - start);
            let chunk: Vec<usize> = (0..size).map(|k| self.prompt_index(first + start + k)).collect();
            let samples = self.sample_chunk(&policy, &chunk, first + start)?;
            // Scores from the reward model on the rendered conversation.
            let rm_inputs: Vec<Vec<u32>> = chunk
                .iter()
                .zip(&samples)
                .map(|(&p, (_, text))| {
                    let full = append_reply(&self.prompt_texts[p], text);
                    reward_input_text(self.reward_tokenizer(), &full, self.config.seq_length)
                })
                .collect();
            let raw_scores = self.reward.score_ids(&rm_inputs, size, pad_id(self.reward_tokenizer()))?;
            let rows: Vec<(&[u32], &[u32])> =
                chunk.iter().zip(&samples).map(|(&p, (r, _))| (self.prompts[p].as_slice(), r.as_slice())).collect();
            let (lp, values, mask) = self.response_logprobs_values(&policy, Some(&self.value_head), &rows)?;
            let (ref_lp, _, _) = self.response_logprobs_values(&self.reference, None, &rows)?;
            let to_rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.detach().to_dtype(DType::F64)?.to_vec2()?) };
            let (lp, ref_lp, mask) = (to_rows(&lp)?, to_rows(&ref_lp)?, to_rows(&mask)?);
            let values = to_rows(&values.expect("policy rows have values"))?;
            // KL estimate for the controller and the metrics, over each response's real tokens.
            for (b, (response, _)) in samples.iter().enumerate() {
                let len = response.len();
                kl_sum += response_kl(&lp[b][..len], &ref_lp[b][..len]);
            }
            let scores =
                self.score_stats.clip_and_scale(&raw_scores, self.config.cliprange_reward, self.config.scale_reward);
            let rewards = kl_penalized_rewards(&lp, &ref_lp, &mask, &scores, self.kl.value, None)?;
            for (b, ((&p, (response, _)), raw)) in chunk.iter().zip(samples).zip(&raw_scores).enumerate() {
                let len = response.len();
                rollouts.push(Rollout {
                    prompt: self.prompts[p].clone(),
                    response,
                    logprobs: lp[b][..len].to_vec(),
                    values: values[b][..len].to_vec(),
                    rewards: rewards.rewards[b][..len].to_vec(),
                    score: *raw,
                });
            }
            start += size;
        }
        Ok((rollouts, kl_sum / n as f64))
    }

    fn padded(rows: &[&[f64]], t_max: usize, device: &Device) -> Result<(Vec<Vec<f64>>, Tensor)> {
        let grid: Vec<Vec<f64>> =
            rows.iter().map(|r| (0..t_max).map(|t| r.get(t).copied().unwrap_or(0.0)).collect()).collect();
        let flat: Vec<f32> = grid.iter().flatten().map(|&x| x as f32).collect();
        let tensor = Tensor::from_vec(flat, (rows.len(), t_max), device)?;
        Ok((grid, tensor))
    }

    /// One clipped update on a minibatch of rollouts.
    fn update(&mut self, batch: &[&Rollout], lr: f64) -> Result<PpoLossStats> {
        let device = self.policy.device().clone();
        let t_max = batch.iter().map(|r| r.response.len()).max().unwrap_or(0);
        let (old_values, old_values_t) =
            Self::padded(&batch.iter().map(|r| r.values.as_slice()).collect::<Vec<_>>(), t_max, &device)?;
        let (rewards, _) =
            Self::padded(&batch.iter().map(|r| r.rewards.as_slice()).collect::<Vec<_>>(), t_max, &device)?;
        let (_, old_logprobs) =
            Self::padded(&batch.iter().map(|r| r.logprobs.as_slice()).collect::<Vec<_>>(), t_max, &device)?;
        let (advantages, returns) = gae(&rewards, &old_values, self.config.gamma, self.config.lam);
        let advantages = whiten(&advantages, None).values;
        let as_tensor = |rows: &[Vec<f64>]| -> Result<Tensor> {
            let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
            Ok(Tensor::from_vec(flat, (rows.len(), t_max), &device)?)
        };
        let model = self.policy.model()?;
        let rows: Vec<(&[u32], &[u32])> = batch.iter().map(|r| (r.prompt.as_slice(), r.response.as_slice())).collect();
        let (logprobs, values, mask) = self.response_logprobs_values(&model, Some(&self.value_head), &rows)?;
        let values = values.expect("policy rows have values");
        let (advantages, returns) = (as_tensor(&advantages)?, as_tensor(&returns)?);
        let inputs = PpoLossTensors {
            logprobs: &logprobs,
            values: &values,
            old_logprobs: &old_logprobs,
            old_values: &old_values_t,
            advantages: &advantages,
            returns: &returns,
            mask: &mask,
        };
        let params = PpoLossParams {
            cliprange: self.config.cliprange,
            cliprange_value: self.config.cliprange_value,
            vf_coef: self.config.vf_coef,
        };
        let (loss, stats) = ppo_loss(&inputs, &params)?;
        let named = Self::all_vars(&self.policy, &self.value_head);
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
        let mut grads = gradients(&loss.backward()?, &vars)?;
        clip_grad_norm(&mut grads, self.config.max_grad_norm)?;
        self.optimizer.step(&vars, &grads, lr)?;
        Ok(stats)
    }

    /// Run cycles until `epochs` cycles or `total_steps` steps are done, appending a line to
    /// `metrics.jsonl` per cycle and checkpointing every `checkpoint_interval` cycles.
    pub fn run(&mut self, mut on_cycle: impl FnMut(&CycleMetrics)) -> Result<()> {
        let out = self.config.checkpoint_dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| Error::new(format!("cannot create {}: {e}", out.display())))?;
        let metrics_path = out.join("metrics.jsonl");
        keep_metrics_lines(&metrics_path, self.iteration)?;
        while self.iteration < self.config.epochs && self.step < self.config.total_steps {
            let started = std::time::Instant::now();
            let kl_coef = self.kl.value;
            let (rollouts, mean_kl) = self.make_experience()?;
            let mut order: Vec<usize> = (0..rollouts.len()).collect();
            shuffle(&mut order, &mut Rng::new(self.config.seed ^ (0xB47C_4000 + self.iteration as u64)));
            let mut sum = PpoLossStats {
                loss: 0.0,
                pg_loss: 0.0,
                vf_loss: 0.0,
                pg_clipfrac: 0.0,
                vf_clipfrac: 0.0,
                approx_kl: 0.0,
                approx_kl_masked_mean: 0.0,
                n: 0.0,
            };
            let mut updates = 0;
            let mut lr = self.config.lr;
            'minibatches: for group in order.chunks(self.config.batch_size) {
                let batch: Vec<&Rollout> = group.iter().map(|&i| &rollouts[i]).collect();
                for _ in 0..self.config.ppo_epochs {
                    if self.step >= self.config.total_steps {
                        break 'minibatches;
                    }
                    lr = match self.config.eta_min {
                        Some(min) => cosine_with_warmup(self.step, self.config.total_steps, 0, self.config.lr, min),
                        None => self.config.lr,
                    };
                    let s = self.update(&batch, lr)?;
                    self.kl.update(mean_kl, self.config.batch_size);
                    self.step += 1;
                    updates += 1;
                    sum.loss += s.loss;
                    sum.pg_loss += s.pg_loss;
                    sum.vf_loss += s.vf_loss;
                    sum.pg_clipfrac += s.pg_clipfrac;
                    sum.vf_clipfrac += s.vf_clipfrac;
                    sum.approx_kl += s.approx_kl;
                    sum.approx_kl_masked_mean += s.approx_kl_masked_mean;
                    sum.n += s.n;
                }
            }
            let k = updates.max(1) as f64;
            let scores: Vec<f64> = rollouts.iter().map(|r| r.score).collect();
            let mean_score = scores.iter().sum::<f64>() / scores.len() as f64;
            let std_score = (scores.iter().map(|s| (s - mean_score).powi(2)).sum::<f64>() / scores.len() as f64).sqrt();
            let metrics = CycleMetrics {
                iteration: self.iteration,
                step: self.step,
                mean_score,
                std_score,
                mean_kl,
                kl_coef,
                kl_coef_after: self.kl.value,
                mean_response_len: rollouts.iter().map(|r| r.response.len() as f64).sum::<f64>()
                    / rollouts.len() as f64,
                lr,
                loss: PpoLossStats {
                    loss: sum.loss / k,
                    pg_loss: sum.pg_loss / k,
                    vf_loss: sum.vf_loss / k,
                    pg_clipfrac: sum.pg_clipfrac / k,
                    vf_clipfrac: sum.vf_clipfrac / k,
                    approx_kl: sum.approx_kl / k,
                    approx_kl_masked_mean: sum.approx_kl_masked_mean / k,
                    n: sum.n / k,
                },
                updates,
            };
            append_line(&metrics_path, &serde_json::to_string(&metrics).expect("metrics serialize"))?;
            tracing::info!("cycle {} took {:.1?}", self.iteration, started.elapsed());
            on_cycle(&metrics);
            self.iteration += 1;
            let finished = self.iteration >= self.config.epochs || self.step >= self.config.total_steps;
            if finished || self.iteration.is_multiple_of(self.config.checkpoint_interval) {
                self.save_checkpoint()?;
            }
        }
        Ok(())
    }

    /// `checkpoint_dir/checkpoint/`: variables, value head, optimizer moments and the state,
    /// written into a fresh folder that then replaces the old one.
    pub fn save_checkpoint(&self) -> Result<()> {
        let out = &self.config.checkpoint_dir;
        let tmp = out.join(format!(".checkpoint.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::new(format!("cannot create {}: {e}", tmp.display())))?;
        let detached =
            |vars: Vec<(String, Var)>| vars.into_iter().map(|(n, v)| (n, v.as_detached_tensor())).collect::<Vec<_>>();
        write_safetensors_atomic(&tmp.join("policy.safetensors"), &detached(self.policy.vars()))?;
        write_safetensors_atomic(&tmp.join("value_head.safetensors"), &detached(self.value_head.vars()))?;
        let names: Vec<String> = Self::all_vars(&self.policy, &self.value_head).into_iter().map(|(n, _)| n).collect();
        write_safetensors_atomic(&tmp.join("optimizer.safetensors"), &self.optimizer.state(&names))?;
        let state = TrainerState {
            config: self.config.clone(),
            iteration: self.iteration,
            step: self.step,
            kl_coef: self.kl.value,
            score_stats: self.score_stats.clone(),
            optimizer_steps: self.optimizer.steps,
        };
        let text = serde_json::to_string_pretty(&state).expect("state serializes");
        write_bytes_atomic(&tmp.join("state.json"), text.as_bytes())?;
        let dest = out.join("checkpoint");
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest)
            .map_err(|e| Error::new(format!("cannot move {} to {}: {e}", tmp.display(), dest.display())))
    }

    /// The trained policy as a model folder `vicuna` loads (LoRA merged), with trlX's value head
    /// beside it in `value_head.safetensors` and the tokenizer files.
    pub fn save_policy(&self, out: &Path) -> Result<()> {
        self.policy.save(out, &self.config.model_path.join("config.json"), true, candle_core::DType::F32)?;
        let head: Vec<(String, Tensor)> =
            self.value_head.vars().into_iter().map(|(n, v)| (n, v.as_detached_tensor())).collect();
        write_safetensors_atomic(&out.join("value_head.safetensors"), &head)?;
        let tokenizer_dir: PathBuf = match &self.config.tokenizer_path {
            Some(file) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
            None => self.config.model_path.clone(),
        };
        copy_tokenizer_files(&tokenizer_dir, out)
    }

    /// Sample one response to each of the first `n` prompts (random streams numbered from
    /// `seed`) and score it: `(response text, raw score)`, for comparing policies outside training.
    pub fn sample_and_score(&self, n: usize, seed: u64) -> Result<Vec<(String, f64)>> {
        let policy = self.policy.frozen_model()?;
        let chunk: Vec<usize> = (0..n).map(|i| i % self.prompts.len()).collect();
        let samples = self.sample_chunk(&policy, &chunk, seed as usize)?;
        let inputs: Vec<Vec<u32>> = chunk
            .iter()
            .zip(&samples)
            .map(|(&p, (_, text))| {
                let full = append_reply(&self.prompt_texts[p], text);
                reward_input_text(self.reward_tokenizer(), &full, self.config.seq_length)
            })
            .collect();
        let scores = self.reward.score_ids(&inputs, chunk.len(), pad_id(self.reward_tokenizer()))?;
        Ok(samples.into_iter().map(|(_, text)| text).zip(scores).collect())
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::new(format!("cannot open {}: {e}", path.display())))?;
    writeln!(f, "{line}").map_err(|e| Error::new(format!("cannot write {}: {e}", path.display())))
}

/// Keep the first `n` lines of the metrics (a resumed run rewrites what came after its
/// checkpoint; a fresh run starts empty).
fn keep_metrics_lines(path: &Path, n: usize) -> Result<()> {
    let kept: String = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().take(n).map(|l| format!("{l}\n")).collect(),
        Err(_) => String::new(),
    };
    write_bytes_atomic(path, kept.as_bytes())
}

/// Read `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<CycleMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::new(format!("{}:{}: not a metrics line ({e})", path.display(), i + 1)))
        })
        .collect()
}
