//! Choosing the next token from logits, with the controls and order of transformers' `generate`:
//! logits processors first (logit bias, repetition penalty, OpenAI's presence and frequency
//! penalties, tokens banned now), then the warpers (temperature, top-k, top-p, typical-p), then a
//! draw from the softmax — or argmax when greedy.

use crate::rng::Rng;
use crate::score::log_normalizer;

/// The knobs of one request's sampling. Defaults follow transformers and the model card.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// false = greedy (argmax after the processors).
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f32,
    pub typical_p: f32,
    /// transformers' penalty over prompt and generated tokens; 1.0 disables it.
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token generated so far (not the prompt's).
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated so far.
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token; −100 or less bans it outright (OpenAI: "−100 should
    /// result in a ban"), so it is never chosen whatever the other logits are.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            do_sample: true,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A logit bias at or below this bans the token.
pub const BAN_BIAS: f32 = -100.0;

impl SamplingParams {
    /// The one check of every sampling parameter, for the command line, both HTTP APIs and
    /// training: values transformers or OpenAI reject are refused with a message a user can act on,
    /// which starts with the parameter's name (callers spell it their way: `--top-p`, `top_p`).
    /// `vocab_size` bounds the token ids of `logit_bias`.
    pub fn validate(&self, vocab_size: usize) -> Result<(), String> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be > 0 when sampling (got {})", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1] (got {})", self.top_p));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(format!("typical_p must be in (0, 1] (got {})", self.typical_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0 (got {})", self.repetition_penalty));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be between -2 and 2 (got {value})"));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(format!(
                    "logit_bias names token id {id}, which is not in the vocabulary (ids 0..{vocab_size})"
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!("logit_bias gives token {id} a bias of {bias}; it must be between -100 and 100"));
            }
        }
        Ok(())
    }
}

/// The tokens so far, as the processors see them.
#[derive(Clone, Copy)]
pub struct History<'a> {
    /// Prompt and generated ids.
    pub context: &'a [u32],
    /// How many of `context` are the prompt's.
    pub prompt_len: usize,
}

impl<'a> History<'a> {
    /// Ids with no prompt (the processors then see them all as generated).
    pub fn generated(ids: &'a [u32]) -> Self {
        History { context: ids, prompt_len: 0 }
    }
}

/// A token and its log-probability, under the distribution the token was drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// What [`Sampler::sample`] chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub id: u32,
    /// log-probability of `id` under the distribution it was drawn from: after the processors and
    /// warpers (temperature, top-k, top-p, typical-p, renormalized), as TGI reports it and as vLLM's
    /// `processed_logprobs`; for a greedy pick, the softmax of the processed logits.
    pub logprob: f32,
    /// The most likely tokens of that same distribution, most likely first (as many as asked for,
    /// fewer when fewer are possible): the chosen token is among them whenever it is likely enough.
    pub top: Vec<TokenLogprob>,
}

/// The distribution one step draws from (see [`Sampler::distribution`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// No sampling: the argmax, with its log-probability and the most likely tokens under the
    /// softmax of the processed logits (for the reports).
    Greedy { id: u32, logprob: f32, top: Vec<TokenLogprob> },
    /// The possible tokens and their probabilities (summing to 1; empty when nothing is possible).
    Sparse { ids: Vec<u32>, probs: Vec<f32> },
}

impl Distribution {
    /// Probability of `id`: 1 or 0 for a greedy step.
    pub fn prob(&self, id: u32) -> f64 {
        match self {
            Distribution::Greedy { id: chosen, .. } => f64::from(u8::from(*chosen == id)),
            Distribution::Sparse { ids, probs } => ids.iter().position(|&i| i == id).map_or(0.0, |at| probs[at] as f64),
        }
    }

    /// How sure the distribution is of `id`: its probability, the softmax of the processed logits for a
    /// greedy step (where [`Distribution::prob`] is 1 or 0).
    pub fn confidence(&self, id: u32) -> f64 {
        match self {
            Distribution::Greedy { id: chosen, logprob, .. } if *chosen == id => f64::from(*logprob).exp(),
            _ => self.prob(id),
        }
    }

    /// The pick of `id` with its log-probability and the `top_n` most likely tokens.
    fn pick(&self, id: u32, top_n: usize) -> Pick {
        match self {
            Distribution::Greedy { id: best, logprob, top } => {
                debug_assert_eq!(*best, id);
                Pick { id, logprob: *logprob, top: top.iter().take(top_n).copied().collect() }
            }
            Distribution::Sparse { ids, probs } => {
                let Some(at) = ids.iter().position(|&i| i == id) else {
                    return Pick { id, logprob: f32::NEG_INFINITY, top: Vec::new() };
                };
                let top = top_indices(probs, top_n)
                    .into_iter()
                    .filter(|&i| probs[i] > 0.0)
                    .map(|i| TokenLogprob { id: ids[i], logprob: probs[i].ln() })
                    .collect();
                Pick { id, logprob: probs[at].ln(), top }
            }
        }
    }
}

/// One request's sampler: its parameters and its own random stream, so that a seeded request
/// gives the same tokens whatever else runs beside it.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Sampler { params, rng: Rng::new(seed) }
    }

    /// Pick the next token. `ban` lists tokens that must not be chosen now (EOS before
    /// `min_new_tokens`, what a grammar forbids); `top_n` asks for that many of the most likely
    /// tokens too. `logits` is scratch space and is modified.
    pub fn sample(&mut self, logits: &mut [f32], history: History, ban: &[u32], top_n: usize) -> Pick {
        let dist = self.distribution(logits, history, ban, top_n);
        let chosen = self.draw_from(&dist).unwrap_or_else(|| argmax(logits));
        dist.pick(chosen, top_n)
    }

    /// Draw a token from `dist` (its argmax when greedy); None when no token is possible.
    pub fn draw_from(&mut self, dist: &Distribution) -> Option<u32> {
        match dist {
            Distribution::Greedy { id, .. } => Some(*id),
            Distribution::Sparse { ids, probs } if !ids.is_empty() => Some(ids[self.draw(probs)]),
            Distribution::Sparse { .. } => None,
        }
    }

    /// Check a proposed token against this step's distribution p (speculative decoding,
    /// Leviathan et al. 2023 / Chen et al. 2023). `draft_probs` is the distribution the proposal
    /// was drawn from (a draft model's, processed by the same parameters), or None for a
    /// deterministic proposal (prompt lookup: all its mass on `draft`). Greedy: the proposal is
    /// kept when it is the argmax. Sampling: kept with probability min(1, p(d)/q(d)); otherwise a
    /// token is drawn from max(0, p − q), renormalized, so the result is distributed exactly as p.
    /// Returns the pick and whether it is the proposal.
    pub fn sample_draft(
        &mut self,
        logits: &mut [f32],
        history: History,
        ban: &[u32],
        top_n: usize,
        draft: u32,
        draft_probs: Option<&Distribution>,
    ) -> (Pick, bool) {
        let dist = self.distribution(logits, history, ban, top_n);
        let (ids, probs) = match &dist {
            Distribution::Greedy { id, .. } => return (dist.pick(*id, top_n), *id == draft),
            Distribution::Sparse { ids, probs } if !ids.is_empty() => (ids, probs),
            Distribution::Sparse { .. } => return (dist.pick(argmax(logits), top_n), false),
        };
        let q = |id: u32| draft_probs.map_or(f64::from(u8::from(id == draft)), |d| d.prob(id));
        let p_draft = dist.prob(draft);
        let q_draft = q(draft);
        if q_draft > 0.0 && self.rng.next_f64() < (p_draft / q_draft).min(1.0) {
            return (dist.pick(draft, top_n), true);
        }
        let residual: Vec<f32> = ids.iter().zip(probs).map(|(&id, &p)| (p as f64 - q(id)).max(0.0) as f32).collect();
        let total: f64 = residual.iter().map(|&r| r as f64).sum();
        // p == q everywhere leaves nothing to draw from (the proposal was then always kept but for
        // rounding): draw from p itself.
        let chosen = if total > 0.0 {
            let normalized: Vec<f32> = residual.iter().map(|&r| (r as f64 / total) as f32).collect();
            ids[self.draw(&normalized)]
        } else {
            ids[self.draw(probs)]
        };
        (dist.pick(chosen, top_n), chosen == draft)
    }

    /// The distribution the next token is drawn from: the processors, the ban, then temperature,
    /// top-k, top-p and typical-p (renormalized). A greedy step lists its `top_n` most likely
    /// tokens for the reports. `logits` is scratch space and is modified.
    pub fn distribution(&self, logits: &mut [f32], history: History, ban: &[u32], top_n: usize) -> Distribution {
        self.process(logits, history);
        for &id in ban {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if !self.params.do_sample {
            let id = argmax(logits);
            let (max, log_sum) = log_normalizer(logits);
            let logprob = |i: usize| ((logits[i] - max) as f64 - log_sum) as f32;
            let top: Vec<TokenLogprob> = top_indices(logits, top_n)
                .into_iter()
                .map(|i| TokenLogprob { id: i as u32, logprob: logprob(i) })
                .collect();
            return Distribution::Greedy { id, logprob: logprob(id as usize), top };
        }
        let p = &self.params;
        if p.temperature != 1.0 {
            logits.iter_mut().for_each(|l| *l /= p.temperature);
        }
        if p.top_k > 0 {
            top_k_filter(logits, p.top_k);
        }
        // Only tokens still possible matter from here on; after top-k that is a few dozen of the
        // 32000, so the sorting filters and the draw work on that short list.
        let (ids, mut candidates): (Vec<u32>, Vec<f32>) =
            logits.iter().enumerate().filter(|(_, l)| **l > f32::NEG_INFINITY).map(|(i, &l)| (i as u32, l)).unzip();
        if ids.is_empty() {
            return Distribution::Sparse { ids, probs: Vec::new() };
        }
        if p.top_p < 1.0 {
            top_p_filter(&mut candidates, p.top_p);
        }
        if p.typical_p < 1.0 {
            typical_filter(&mut candidates, p.typical_p);
        }
        Distribution::Sparse { probs: softmax(&candidates), ids }
    }

    /// The logits processors, in transformers' order (bias first, as OpenAI and vLLM apply it).
    fn process(&self, logits: &mut [f32], history: History) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if bias <= BAN_BIAS { f32::NEG_INFINITY } else { *l + bias };
            }
        }
        apply_repetition_penalty(logits, history.context, p.repetition_penalty);
        apply_presence_frequency(
            logits,
            &history.context[history.prompt_len.min(history.context.len())..],
            p.presence_penalty,
            p.frequency_penalty,
        );
    }

    /// Inverse-CDF draw from a probability vector; returns the index.
    fn draw(&mut self, probs: &[f32]) -> usize {
        let u = self.rng.next_f64();
        let mut acc = 0.0f64;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last_nonzero = i;
                if u < acc {
                    return i;
                }
            }
        }
        // Rounding left `acc` a hair under 1: the draw belongs to the last possible token.
        last_nonzero
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token already present has its logit
/// divided by the penalty if positive, multiplied if negative (once, however often it appears).
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = &mut logits[i];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// OpenAI's presence and frequency penalties: `logit[t] -= presence · [count[t] > 0] + frequency · count[t]`,
/// counting each token's occurrences in `generated` (the reply so far, never the prompt).
pub fn apply_presence_frequency(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &id in generated {
        *counts.entry(id).or_default() += 1;
    }
    for (id, count) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= presence + frequency * count as f32;
        }
    }
}

/// Indices of the `n` largest values, largest first (ties: lower index first).
fn top_indices(values: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut indices: Vec<usize> = (0..values.len()).collect();
    indices.select_nth_unstable_by(n - 1, order);
    indices.truncate(n);
    indices.sort_by(order);
    indices
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Token indices sorted by logit, largest first (stable: ties keep index order).
fn sorted_desc(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
}

/// Keep the `k` largest logits (and any tied with the k-th, as transformers' threshold does).
fn top_k_filter(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut values = logits.to_vec();
    values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = values[k - 1];
    logits.iter_mut().filter(|l| **l < threshold).for_each(|l| *l = f32::NEG_INFINITY);
}

/// Nucleus filter as transformers' `TopPLogitsWarper`: walking from the least likely token up,
/// drop tokens while the probability mass dropped stays ≤ 1 - top_p; the most likely token always
/// stays. What is left is the smallest set of most likely tokens whose mass is ≥ top_p.
fn top_p_filter(logits: &mut [f32], top_p: f32) {
    let probs = softmax(logits);
    let order = sorted_desc(logits);
    let mut removed_mass = 0.0f32;
    for &i in order.iter().skip(1).rev() {
        removed_mass += probs[i];
        if removed_mass > 1.0 - top_p {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

/// Locally typical sampling as transformers' `TypicalLogitsWarper`: rank tokens by how far their
/// surprise is from the distribution's entropy and keep the closest ones until `mass` is covered.
fn typical_filter(logits: &mut [f32], mass: f32) {
    let probs = softmax(logits);
    let entropy: f32 = probs.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
    let shift: Vec<f32> =
        probs.iter().map(|&p| if p > 0.0 { (-p.ln() - entropy).abs() } else { f32::INFINITY }).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| shift[a].total_cmp(&shift[b]));
    // Number of leading tokens whose cumulative mass stays below `mass`; that many plus one stay.
    let mut cumulative = 0.0f32;
    let mut last = 0;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if cumulative < mass {
            last = rank + 1;
        }
    }
    let last = last.min(order.len() - 1);
    let cutoff = shift[order[last]];
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && shift[i] > cutoff {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pearson's chi-square of `counts` against `probs` (cells with probability > 0).
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum()
    }

    /// The speculative check keeps the model's distribution: a draft model's guesses drawn from
    /// q, and lookup's fixed guess, both give tokens distributed as p (temperature and top-k
    /// applied), by a chi-square test over 40,000 draws; and a greedy check keeps exactly the argmax.
    #[test]
    fn speculative_sampling_keeps_the_target_distribution() {
        let target = [1.0f32, 2.5, 0.3, 2.0, -1.0, 1.7, 0.0, 2.2];
        let draft = [2.0f32, 0.5, 1.0, 2.4, 0.2, -0.5, 1.5, 0.0];
        let params = SamplingParams { do_sample: true, temperature: 0.9, top_k: 6, ..Default::default() };
        let history = History::generated(&[]);
        let p = Sampler::new(params.clone(), 0).distribution(&mut target.to_vec(), history, &[], 0);
        let q = Sampler::new(params.clone(), 0).distribution(&mut draft.to_vec(), history, &[], 0);
        let p_of: Vec<f64> = (0..8).map(|i| p.prob(i)).collect();
        let n = 40_000;
        let mut checker = Sampler::new(params.clone(), 1);
        let mut guesser = Sampler::new(params.clone(), 2);
        for proposal in ["draft model", "lookup"] {
            let mut counts = [0usize; 8];
            let mut kept = 0;
            for _ in 0..n {
                let (guess, q) = match proposal {
                    "draft model" => (guesser.draw_from(&q).unwrap(), Some(&q)),
                    _ => (3, None),
                };
                let (pick, was_kept) = checker.sample_draft(&mut target.to_vec(), history, &[], 0, guess, q);
                assert_eq!(was_kept, pick.id == guess);
                counts[pick.id as usize] += 1;
                kept += usize::from(was_kept);
            }
            // 5 degrees of freedom (6 tokens survive top-k): P(chi2 > 25.7) = 1e-4.
            let chi2 = chi_square(&counts, &p_of);
            assert!(chi2 < 25.7, "{proposal}: chi-square {chi2}, counts {counts:?}, p {p_of:?}");
            assert_eq!(counts[4] + counts[6], 0, "{proposal}: top-k removed tokens 4 and 6");
            // Guesses are kept as often as the theory says: sum of min(p, q) for a draft, p(3) for lookup.
            let expect = match proposal {
                "draft model" => (0..8).map(|i| p.prob(i).min(q.prob(i))).sum::<f64>(),
                _ => p.prob(3),
            };
            let rate = kept as f64 / n as f64;
            assert!((rate - expect).abs() < 0.015, "{proposal}: kept {rate}, expected {expect}");
        }
        let greedy = SamplingParams { do_sample: false, ..Default::default() };
        let mut s = Sampler::new(greedy, 0);
        assert_eq!(
            s.sample_draft(&mut target.to_vec(), history, &[], 0, 1, None),
            (s.sample(&mut target.to_vec(), history, &[], 0), true)
        );
        assert!(!s.sample_draft(&mut target.to_vec(), history, &[], 0, 3, None).1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = vec![0.1, 2.0, -1.0, 1.9, 0.5];
        for seed in 0..50 {
            let params = SamplingParams { top_k: 1, ..Default::default() };
            let mut s = Sampler::new(params, seed);
            assert_eq!(s.sample(&mut logits.clone(), History::generated(&[]), &[], 0).id, argmax(&logits));
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probs ∝ [0.5, 0.3, 0.15, 0.05]; top_p 0.75 keeps {0, 1}: 0.5 alone is < 0.75.
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p_filter(&mut logits, 0.75);
        let kept: Vec<bool> = logits.iter().map(|l| l.is_finite()).collect();
        assert_eq!(kept, [true, true, false, false]);
        // top_p 0.81: dropping 0.15 too would drop 0.2 > 0.19 of mass, so token 2 stays.
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p_filter(&mut logits, 0.81);
        assert!(logits[2].is_finite() && !logits[3].is_finite());
        // A tiny top_p still keeps the best token.
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p_filter(&mut logits, 0.01);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
    }

    #[test]
    fn top_p_sampling_never_leaves_the_nucleus_and_follows_its_distribution() {
        // 10 tokens with geometric probabilities; top_p 0.9 keeps the first few.
        let probs: Vec<f32> = (0..10).map(|i| 0.5f32.powi(i + 1)).collect();
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let params = SamplingParams { top_k: 0, top_p: 0.9, ..Default::default() };
        let mut s = Sampler::new(params, 1234);
        let mut counts = [0usize; 10];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&mut logits.clone(), History::generated(&[]), &[], 0).id as usize] += 1;
        }
        // Mass so far: .5, .75, .875, .9375 → the nucleus is tokens 0..4 (0.875 < 0.9).
        assert!(counts[4..].iter().all(|&c| c == 0), "{counts:?}");
        let nucleus: f32 = probs[..4].iter().sum();
        for i in 0..4 {
            let expected = probs[i] / nucleus;
            let observed = counts[i] as f32 / n as f32;
            // 5 standard deviations of a binomial proportion.
            let sd = (expected * (1.0 - expected) / n as f32).sqrt();
            assert!((observed - expected).abs() < 5.0 * sd, "token {i}: {observed} vs {expected}");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once() {
        let mut logits = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 1], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let logits = vec![5.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams { do_sample: false, ..Default::default() }, 0);
        assert_eq!(s.sample(&mut logits.clone(), History::generated(&[]), &[0], 0).id, 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed);
            (0..50).map(|_| s.sample(&mut logits.clone(), History::generated(&[]), &[], 0).id).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn presence_and_frequency_count_generated_tokens_only() {
        // Context: prompt [0, 1], generated [1, 2, 2]. OpenAI: logit -= presence·[c>0] + frequency·c.
        let mut logits = vec![1.0f32; 4];
        let history = History { context: &[0, 1, 1, 2, 2], prompt_len: 2 };
        let s =
            Sampler::new(SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() }, 0);
        s.process(&mut logits, history);
        assert_eq!(logits, vec![1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.5, 1.0]);
    }

    #[test]
    fn logit_bias_adds_and_minus_100_bans() {
        let logits = vec![50.0f32, 0.0, 0.0, 1.0];
        let params = SamplingParams { logit_bias: vec![(0, -100.0), (2, 3.0)], top_k: 0, ..Default::default() };
        let mut s = Sampler::new(params.clone(), 3);
        let mut processed = logits.clone();
        s.process(&mut processed, History::generated(&[]));
        assert_eq!(processed, vec![f32::NEG_INFINITY, 0.0, 3.0, 1.0]);
        for _ in 0..2000 {
            assert_ne!(s.sample(&mut logits.clone(), History::generated(&[]), &[], 0).id, 0);
        }
        let greedy = SamplingParams { do_sample: false, ..params };
        assert_eq!(Sampler::new(greedy, 0).sample(&mut logits.clone(), History::generated(&[]), &[], 0).id, 2);
    }

    #[test]
    fn top_logprobs_are_the_distribution_the_token_came_from() {
        let logits: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        // Greedy: the full log-softmax; the pick is the first of the list.
        let mut greedy = Sampler::new(SamplingParams { do_sample: false, ..Default::default() }, 0);
        let pick = greedy.sample(&mut logits.clone(), History::generated(&[]), &[], 5);
        assert_eq!(pick.top.len(), 5);
        assert_eq!(pick.top[0], TokenLogprob { id: pick.id, logprob: pick.logprob });
        assert!(pick.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        let reference = crate::score::log_softmax_at(&logits, 7) as f32;
        let listed = greedy.sample(&mut logits.clone(), History::generated(&[]), &[], 40);
        assert_eq!(listed.top.iter().find(|t| t.id == 7).unwrap().logprob, reference);
        // Sampled with top-k 3 and a temperature: three tokens, their probabilities sum to 1, and the
        // chosen token's logprob is its entry in the list.
        let params = SamplingParams { temperature: 0.7, top_k: 3, ..Default::default() };
        let mut s = Sampler::new(params, 9);
        for _ in 0..50 {
            let pick = s.sample(&mut logits.clone(), History::generated(&[]), &[], 10);
            assert_eq!(pick.top.len(), 3);
            let total: f32 = pick.top.iter().map(|t| t.logprob.exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
            assert_eq!(pick.top.iter().find(|t| t.id == pick.id).unwrap().logprob, pick.logprob);
        }
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = |p: SamplingParams| p.validate(10).unwrap_err();
        assert!(bad(SamplingParams { presence_penalty: 2.5, ..Default::default() }).contains("presence_penalty"));
        assert!(bad(SamplingParams { frequency_penalty: -3.0, ..Default::default() }).contains("frequency_penalty"));
        assert!(bad(SamplingParams { logit_bias: vec![(10, 1.0)], ..Default::default() }).contains("token id 10"));
        assert!(bad(SamplingParams { logit_bias: vec![(1, -101.0)], ..Default::default() }).contains("-100 and 100"));
        assert!(SamplingParams { logit_bias: vec![(9, -100.0)], ..Default::default() }.validate(10).is_ok());
    }

    #[test]
    fn typical_p_keeps_tokens_closest_to_the_entropy() {
        // One dominant token and a flat tail: the entropy is low, so the dominant token is
        // the most "typical" and a small mass keeps only it.
        let mut probs = vec![0.9f32];
        probs.extend(std::iter::repeat_n(0.01, 10));
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        typical_filter(&mut logits, 0.5);
        assert!(logits[0].is_finite());
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
        // mass 1.0 is handled by the caller (off); 0.95 needs the dominant token plus tail tokens.
        let mut logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        typical_filter(&mut logits, 0.95);
        assert!(logits.iter().filter(|l| l.is_finite()).count() > 1);
    }
}
