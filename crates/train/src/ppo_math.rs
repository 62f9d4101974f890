//! The arithmetic of trlX's PPO and of the pairwise reward-model loss.
//!
//! Every formula lives here once. The parts that only ever see numbers from rollouts (the KL
//! controller, the KL-penalised rewards, GAE, whitening, reward scaling) are plain f64. The two
//! losses exist twice: in f64 (checked against `tests/fixtures/ppo/ppo_vectors.json`) and on candle
//! tensors with gradients (what training optimises); a test checks the two agree. Shapes follow
//! trlX: per-token arrays are `[batch][response_len]`, right-padded, with a 0/1 `mask`.

use candle_core::{DType, Tensor};

use crate::error::{bail, Result};

/// trlX's KL coefficient β: adaptive (Ziegler et al. 2019, §2.2) when a target KL is given,
/// fixed otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct KlController {
    pub value: f64,
    /// None: a fixed coefficient (trlX's `FixedKLController`).
    pub target: Option<f64>,
    pub horizon: f64,
}

/// What one adaptive update did (for the vectors test and the logs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlUpdate {
    pub proportional_error: f64,
    pub mult: f64,
}

impl KlController {
    pub fn new(init_kl_coef: f64, target: Option<f64>, horizon: f64) -> Self {
        KlController { value: init_kl_coef, target, horizon }
    }

    /// `β ← β · (1 + clip(current/target − 1, ±0.2) · n_steps/horizon)`; no change when fixed.
    pub fn update(&mut self, current: f64, n_steps: usize) -> KlUpdate {
        let Some(target) = self.target else {
            return KlUpdate { proportional_error: 0.0, mult: 1.0 };
        };
        let proportional_error = (current / target - 1.0).clamp(-0.2, 0.2);
        let mult = 1.0 + proportional_error * n_steps as f64 / self.horizon;
        self.value *= mult;
        KlUpdate { proportional_error, mult }
    }
}

/// KL(π ‖ π_ref) of one sampled response, estimated from its tokens' log-probs under the policy π
/// (which sampled it) and the reference: Σ_t k3, with Schulman's k3 = (ρ − 1) − log ρ and
/// ρ = π_ref(token) / π(token) — never negative, and unbiased for samples from π.
///
/// trlX's `make_experience` turns ρ upside down (`log_ratio.exp() - 1 - log_ratio` with
/// `log_ratio = logprobs - ref_logprobs`): that estimates χ²(π ‖ π_ref) − KL, which agrees with the
/// KL while π stays close to π_ref but grows exponentially once π puts its mass on tokens the
/// reference finds unlikely (a response at KL 6 reads as 200). It is logged as `mean_kl` and fed to
/// the adaptive KL controller, so both would see a number that is not the KL.
pub fn response_kl(logprobs: &[f64], ref_logprobs: &[f64]) -> f64 {
    logprobs
        .iter()
        .zip(ref_logprobs)
        .map(|(lp, ref_lp)| {
            let log_rho = ref_lp - lp;
            log_rho.exp_m1() - log_rho
        })
        .sum()
}

/// Per-token rewards of a batch of rollouts.
#[derive(Clone, Debug, PartialEq)]
pub struct PenalizedRewards {
    pub scores_clipped: Vec<f64>,
    /// Index of each row's last real token, where the score is added.
    pub last_index: Vec<usize>,
    /// `[batch][response_len]`, exactly 0 at padding.
    pub rewards: Vec<Vec<f64>>,
}

/// trlX `make_experience`: `−β·(logp − logp_ref)` per real token, plus the score clipped to
/// `±cliprange_reward` (None: unclipped) on the last real token. Padding entries of the log-probs
/// are ignored, whatever they hold.
pub fn kl_penalized_rewards(
    logprobs: &[Vec<f64>],
    ref_logprobs: &[Vec<f64>],
    mask: &[Vec<f64>],
    scores: &[f64],
    beta: f64,
    cliprange_reward: Option<f64>,
) -> Result<PenalizedRewards> {
    let batch = mask.len();
    if logprobs.len() != batch || ref_logprobs.len() != batch || scores.len() != batch {
        bail!("rewards: logprobs, ref_logprobs, mask and scores must have the same batch size");
    }
    let mut out = PenalizedRewards {
        scores_clipped: Vec::with_capacity(batch),
        last_index: Vec::with_capacity(batch),
        rewards: Vec::with_capacity(batch),
    };
    for b in 0..batch {
        let score = match cliprange_reward {
            Some(c) => scores[b].clamp(-c, c),
            None => scores[b],
        };
        let Some(last) = mask[b].iter().rposition(|&m| m != 0.0) else {
            bail!("rewards: row {b} has no real token (every response has at least one)");
        };
        let mut row: Vec<f64> = (0..mask[b].len())
            .map(|t| if mask[b][t] != 0.0 { -beta * (logprobs[b][t] - ref_logprobs[b][t]) } else { 0.0 })
            .collect();
        row[last] += score;
        out.scores_clipped.push(score);
        out.last_index.push(last);
        out.rewards.push(row);
    }
    Ok(out)
}

/// trlX `get_advantages_and_returns` (without whitening): generalized advantage estimation run
/// backwards over each row; `values` and `rewards` must be 0 at padding, so a row behaves as if it
/// ended at its last real token. Returns `(advantages, returns = advantages + values)`.
pub fn gae(rewards: &[Vec<f64>], values: &[Vec<f64>], gamma: f64, lam: f64) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut returns = Vec::with_capacity(rewards.len());
    for (r, v) in rewards.iter().zip(values) {
        let len = r.len();
        let mut adv = vec![0.0; len];
        let mut run = 0.0;
        for t in (0..len).rev() {
            let next = if t + 1 < len { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            run = delta + gamma * lam * run;
            adv[t] = run;
        }
        returns.push(adv.iter().zip(v).map(|(a, v)| a + v).collect());
        advantages.push(adv);
    }
    (advantages, returns)
}

/// Whitened values and the statistics used.
#[derive(Clone, Debug, PartialEq)]
pub struct Whitened {
    pub mean: f64,
    /// Unbiased: divided by n − 1.
    pub var: f64,
    pub n: usize,
    pub values: Vec<Vec<f64>>,
}

/// `(x − mean) / sqrt(var + 1e-8)` applied to every entry. Statistics over all entries (trlX's
/// `whiten`, padding included) when `mask` is None, over the mask = 1 entries otherwise.
pub fn whiten(xs: &[Vec<f64>], mask: Option<&[Vec<f64>]>) -> Whitened {
    let selected: Vec<f64> = match mask {
        None => xs.iter().flatten().copied().collect(),
        Some(m) => xs.iter().flatten().zip(m.iter().flatten()).filter(|(_, &m)| m != 0.0).map(|(&x, _)| x).collect(),
    };
    let n = selected.len();
    let mean = selected.iter().sum::<f64>() / n as f64;
    let var = selected.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    let values = xs.iter().map(|row| row.iter().map(|x| (x - mean) * scale).collect()).collect();
    Whitened { mean, var, n, values }
}

/// trlX's `RunningMoments` over per-rollout scores: Chan et al.'s parallel update of mean and
/// variance, starting from mean 0, variance 1 and a count of 1e-24.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningMoments {
    pub mean: f64,
    pub var: f64,
    pub std: f64,
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        RunningMoments { mean: 0.0, var: 1.0, std: 1.0, count: 1e-24 }
    }
}

impl RunningMoments {
    /// Fold in a batch; returns the batch's mean and unbiased standard deviation.
    pub fn update(&mut self, xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let xs_mean = xs.iter().sum::<f64>() / n;
        let xs_var = xs.iter().map(|x| (x - xs_mean).powi(2)).sum::<f64>() / n;
        let delta = xs_mean - self.mean;
        let total = self.count + n;
        let old_sum = self.var * self.count + delta * delta * self.count * n / total;
        let total_sum = old_sum + xs_var * n;
        self.mean += delta * n / total;
        self.var = total_sum / total;
        self.std = (self.var * total / (total - 1.0)).sqrt();
        self.count = total;
        (xs_mean, (xs_var * n / (n - 1.0)).sqrt())
    }
}

/// trlX's `scale_reward`: divide the scores by nothing, by the running standard deviation, or by
/// the standard deviation of the first rollout batch ("ref").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RewardScaling {
    None,
    Running,
    Ref,
}

impl RewardScaling {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" | "null" | "~" | "ignored" | "" => Some(RewardScaling::None),
            "running" => Some(RewardScaling::Running),
            "ref" => Some(RewardScaling::Ref),
            _ => None,
        }
    }
}

/// The score statistics PPO carries from one rollout batch to the next.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreStats {
    pub running: RunningMoments,
    /// Standard deviation (unbiased) of the first batch's scores, once seen.
    pub ref_std: Option<f64>,
}

impl ScoreStats {
    /// trlX's order: clip to ±cliprange_reward, record the statistics, then scale. Returns the
    /// scores to add at the last token (already clipped: pass `cliprange_reward = None` on to
    /// [`kl_penalized_rewards`]).
    pub fn clip_and_scale(&mut self, raw: &[f64], cliprange_reward: Option<f64>, scaling: RewardScaling) -> Vec<f64> {
        let clipped: Vec<f64> = raw
            .iter()
            .map(|&s| match cliprange_reward {
                Some(c) => s.clamp(-c, c),
                None => s,
            })
            .collect();
        if self.ref_std.is_none() {
            let n = clipped.len() as f64;
            let mean = clipped.iter().sum::<f64>() / n;
            self.ref_std = Some((clipped.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
        }
        self.running.update(&clipped);
        let divisor = match scaling {
            RewardScaling::None => 1.0,
            RewardScaling::Running => self.running.std,
            RewardScaling::Ref => self.ref_std.unwrap_or(1.0),
        };
        clipped.into_iter().map(|s| s / divisor).collect()
    }
}

/// The clipping constants of trlX's `PPOConfig.loss`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoLossParams {
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
}

/// Inputs of the PPO loss, `[batch][response_len]` each.
pub struct PpoLossInputs<'a> {
    pub logprobs: &'a [Vec<f64>],
    pub values: &'a [Vec<f64>],
    pub old_logprobs: &'a [Vec<f64>],
    pub old_values: &'a [Vec<f64>],
    pub advantages: &'a [Vec<f64>],
    pub returns: &'a [Vec<f64>],
    pub mask: &'a [Vec<f64>],
}

/// The scalars trlX logs for one PPO minibatch.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PpoLossStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    /// trlX's k3 estimate, a mean over all entries (padding counts in the denominator).
    pub approx_kl: f64,
    /// The same per real token.
    pub approx_kl_masked_mean: f64,
    pub n: f64,
}

/// The f64 PPO loss with the per-token intermediates the vectors check.
pub struct PpoLossF64 {
    pub stats: PpoLossStats,
    pub ratio: Vec<Vec<f64>>,
    pub values_clipped: Vec<Vec<f64>>,
}

/// trlX `PPOConfig.loss` in f64 (clipped policy loss + clipped value loss).
pub fn ppo_loss_f64(x: &PpoLossInputs<'_>, p: &PpoLossParams) -> PpoLossF64 {
    let (mut n, mut vf_sum, mut vf_clipped, mut pg_sum, mut pg_clipped) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut kl_sum, mut kl_masked_sum, mut entries) = (0.0, 0.0, 0usize);
    let mut ratio = Vec::with_capacity(x.mask.len());
    let mut values_clipped = Vec::with_capacity(x.mask.len());
    for b in 0..x.mask.len() {
        let mut ratio_row = Vec::with_capacity(x.mask[b].len());
        let mut clipped_row = Vec::with_capacity(x.mask[b].len());
        for t in 0..x.mask[b].len() {
            let m = x.mask[b][t];
            let (v, old_v, ret) = (x.values[b][t], x.old_values[b][t], x.returns[b][t]);
            let v_clipped = v.clamp(old_v - p.cliprange_value, old_v + p.cliprange_value);
            let (vf1, vf2) = ((v - ret).powi(2), (v_clipped - ret).powi(2));
            vf_sum += vf1.max(vf2) * m;
            vf_clipped += if vf2 > vf1 { m } else { 0.0 };

            let log_ratio = (x.logprobs[b][t] - x.old_logprobs[b][t]) * m;
            let r = log_ratio.exp();
            let a = x.advantages[b][t];
            let (pg1, pg2) = (-a * r, -a * r.clamp(1.0 - p.cliprange, 1.0 + p.cliprange));
            pg_sum += pg1.max(pg2) * m;
            pg_clipped += if pg2 > pg1 { m } else { 0.0 };

            let k3 = (r - 1.0) - log_ratio;
            kl_sum += k3;
            kl_masked_sum += k3 * m;
            entries += 1;
            n += m;
            ratio_row.push(r);
            clipped_row.push(v_clipped);
        }
        ratio.push(ratio_row);
        values_clipped.push(clipped_row);
    }
    let pg_loss = pg_sum / n;
    let vf_loss = 0.5 * vf_sum / n;
    let stats = PpoLossStats {
        loss: pg_loss + p.vf_coef * vf_loss,
        pg_loss,
        vf_loss,
        pg_clipfrac: pg_clipped / n,
        vf_clipfrac: vf_clipped / n,
        approx_kl: kl_sum / entries as f64,
        approx_kl_masked_mean: kl_masked_sum / n,
        n,
    };
    PpoLossF64 { stats, ratio, values_clipped }
}

/// Tensor inputs of the PPO loss, `[batch, response_len]` f32. Only `logprobs` and `values` carry
/// gradients; the rest come from the rollout.
pub struct PpoLossTensors<'a> {
    pub logprobs: &'a Tensor,
    pub values: &'a Tensor,
    pub old_logprobs: &'a Tensor,
    pub old_values: &'a Tensor,
    pub advantages: &'a Tensor,
    pub returns: &'a Tensor,
    pub mask: &'a Tensor,
}

/// The same loss as [`ppo_loss_f64`] on tensors: the scalar to backpropagate and the statistics.
pub fn ppo_loss(x: &PpoLossTensors<'_>, p: &PpoLossParams) -> Result<(Tensor, PpoLossStats)> {
    let mask = x.mask;
    let n = mask.sum_all()?;
    let n_value = n.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let old_values = x.old_values.detach();
    let values_clipped =
        x.values.maximum(&(&old_values - p.cliprange_value)?)?.minimum(&(&old_values + p.cliprange_value)?)?;
    let vf1 = x.values.sub(x.returns)?.sqr()?;
    let vf2 = values_clipped.sub(x.returns)?.sqr()?;
    let vf_loss = (vf1.maximum(&vf2)?.mul(mask)?.sum_all()?.broadcast_div(&n)? * 0.5)?;
    let vf_clipfrac = vf2.gt(&vf1)?.to_dtype(DType::F32)?.mul(mask)?.sum_all()?.broadcast_div(&n)?;

    let log_ratio = x.logprobs.sub(x.old_logprobs)?.mul(mask)?;
    let ratio = log_ratio.exp()?;
    let neg_adv = x.advantages.detach().neg()?;
    let pg1 = neg_adv.mul(&ratio)?;
    let pg2 = neg_adv.mul(&ratio.clamp(1.0 - p.cliprange, 1.0 + p.cliprange)?)?;
    let pg_loss = pg1.maximum(&pg2)?.mul(mask)?.sum_all()?.broadcast_div(&n)?;
    let pg_clipfrac = pg2.gt(&pg1)?.to_dtype(DType::F32)?.mul(mask)?.sum_all()?.broadcast_div(&n)?;

    let loss = (&pg_loss + (&vf_loss * p.vf_coef)?)?;
    let k3 = ((ratio.detach() - 1.0)? - log_ratio.detach())?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let stats = PpoLossStats {
        loss: scalar(&loss)?,
        pg_loss: scalar(&pg_loss)?,
        vf_loss: scalar(&vf_loss)?,
        pg_clipfrac: scalar(&pg_clipfrac)?,
        vf_clipfrac: scalar(&vf_clipfrac)?,
        approx_kl: scalar(&k3.mean_all()?)?,
        approx_kl_masked_mean: scalar(&k3.mul(mask)?.sum_all()?)? / n_value,
        n: n_value,
    };
    Ok((loss, stats))
}

/// Pairwise ranking loss of a batch of (chosen, rejected) reward pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct PairwiseLoss {
    pub diff: Vec<f64>,
    pub per_pair_loss: Vec<f64>,
    pub loss: f64,
    /// Share of pairs with `r_chosen > r_rejected` (a tie is wrong).
    pub accuracy: f64,
}

/// `−log σ(r_chosen − r_rejected)`, computed stably as `softplus(−diff)`, averaged.
pub fn pairwise_loss_f64(r_chosen: &[f64], r_rejected: &[f64]) -> PairwiseLoss {
    let diff: Vec<f64> = r_chosen.iter().zip(r_rejected).map(|(c, r)| c - r).collect();
    let per_pair_loss: Vec<f64> = diff.iter().map(|&d| softplus(-d)).collect();
    let n = diff.len() as f64;
    PairwiseLoss {
        loss: per_pair_loss.iter().sum::<f64>() / n,
        accuracy: diff.iter().filter(|&&d| d > 0.0).count() as f64 / n,
        diff,
        per_pair_loss,
    }
}

/// `log(1 + eˣ)` without overflow or cancellation: `max(x, 0) + log1p(e^{−|x|})`.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The pairwise loss on `[batch]` reward tensors: the mean loss to backpropagate and the accuracy.
pub fn pairwise_loss(r_chosen: &Tensor, r_rejected: &Tensor) -> Result<(Tensor, f64)> {
    let neg_diff = r_rejected.sub(r_chosen)?;
    // softplus(x) = relu(x) + log(1 + exp(−|x|)): the same stable form as the f64 version.
    let per_pair = (neg_diff.relu()? + ((neg_diff.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    let loss = per_pair.mean_all()?;
    let wins = neg_diff.lt(0.0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok((loss, wins / r_chosen.dims()[0] as f64))
}
