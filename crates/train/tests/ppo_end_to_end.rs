//! The whole recipe on a tiny LLaMA: SFT a policy on fruit answers, train a reward model that
//! prefers "banana", then PPO from several seeds. Every run raises the mean reward by a clear
//! margin and turns the policy to "banana" while the KL to the reference stays bounded; the same
//! seed gives the same metrics; a run resumed from its checkpoint continues exactly like one that
//! never stopped.
//!
//! `VICUNA_PPO_SEEDS=1-32` (a range or a comma list) runs the same checks over other seeds: a
//! sweep. Seeds 1–32 all pass, the weakest by a clear margin: fresh-sample gain ≥ 1.57 where 1.0
//! is asked, rollout rise ≥ 1.69 where 1.0 is asked, banana share after ≥ 0.69 (up ≥ 0.47) where
//! 0.5 (up 0.3) is asked, KL ≤ 9.3 where 12 is the bound.

mod common;

use std::io::Write;
use std::path::Path;

use candle_core::Device;
use common::*;
use vicuna_train::io::copy_tokenizer_files;
use vicuna_train::params::TrainableLlama;
use vicuna_train::ppo::{read_metrics, PpoTrainer};
use vicuna_train::ppo_config::PpoConfig;
use vicuna_train::reward::{train_rm, RewardModel, RmOptions};
use vicuna_train::sft::{train_sft, SftOptions};

fn prepare(root: &Path) -> PpoConfig {
    let tok = tokenizer();
    let tokenizer_dir = tokenizer_path().parent().unwrap().to_path_buf();
    let policy_dir = root.join("sft");
    let policy = TrainableLlama::load(&model_dir(), None, 0, &Device::Cpu).unwrap();
    // Long enough that the policy answers with a fruit, "banana" about one time in five: PPO then
    // meets the reward in every rollout batch and has a short way up. After 12 epochs it mostly
    // babbled ("banana" in ~3% of samples), a reward came by once a batch or less, and how far PPO
    // got in 10 cycles was down to the seed (fresh-sample gains 0.2 to 2.7 over seeds 1–8).
    let opts = SftOptions { epochs: 24, lr: 5e-3, batch_size: 8, eval_fraction: 0.0, seed: 1, ..Default::default() };
    train_sft(&policy, &tok, &fruit_chats(40), &opts, |_| {}).unwrap();
    policy.save(&policy_dir, &model_dir().join("config.json"), false, candle_core::DType::F32).unwrap();
    copy_tokenizer_files(&tokenizer_dir, &policy_dir).unwrap();

    let rm_dir = root.join("rm");
    let rm = RewardModel::from_causal_lm(&model_dir(), None, 2, &Device::Cpu).unwrap();
    let opts = RmOptions { epochs: 4, lr: 3e-3, batch_size: 8, eval_fraction: 0.0, seed: 2, ..Default::default() };
    train_rm(&rm, &tok, &fruit_preferences(64), &opts, |_| {}).unwrap();
    rm.save(&rm_dir, &model_dir().join("config.json")).unwrap();

    let prompts = root.join("prompts.jsonl");
    let mut f = std::fs::File::create(&prompts).unwrap();
    for p in PROMPTS {
        writeln!(f, "{}", serde_json::json!({"prompt": p, "response": ""})).unwrap();
    }
    let mut config = PpoConfig::default();
    let yaml =
        "train:\n  seed: 1\n  epochs: 10\n  batch_size: 8\n  seq_length: 64\nmethod:\n  num_rollouts: 32\n  chunk_size: 16\n  \
         ppo_epochs: 4\n  init_kl_coef: 0.1\n  target: 6\n  horizon: 10000\n  scale_reward: null\ngen_kwargs:\n  \
         max_new_tokens: 6\n  min_length: null\n  top_k: 0\n  top_p: 1.0\n  temperature: 1.0\n  do_sample: true\noptimizer:\n  lr: 5.0e-4\n  max_grad_norm: 1.0\n";
    config.apply_yaml(yaml, "test.yaml").unwrap();
    config.model_path = policy_dir;
    config.reward_model_path = rm_dir;
    config.prompts_path = prompts;
    config
}

/// The PPO seeds to run: `VICUNA_PPO_SEEDS` ("1-32" or "4,7,9"), else three.
fn seeds() -> Vec<u64> {
    let Ok(spec) = std::env::var("VICUNA_PPO_SEEDS") else {
        return vec![1, 2, 3];
    };
    let bad = || panic!("VICUNA_PPO_SEEDS={spec:?}: want a range such as 1-32 or a list such as 4,7,9");
    let num = |s: &str| s.trim().parse::<u64>().unwrap_or_else(|_| bad());
    match spec.split_once('-') {
        Some((first, last)) => (num(first)..=num(last)).collect(),
        None => spec.split(',').map(num).collect(),
    }
}

/// Share of "banana" answers and mean reward-model score of 64 fresh samples (4 prompts × 16),
/// drawn with the same random streams before and after training.
fn fresh_samples(trainer: &PpoTrainer) -> (f64, f64) {
    let samples = trainer.sample_and_score(64, 1 << 40).unwrap();
    let share = samples.iter().filter(|(text, _)| text.contains(TARGET)).count() as f64 / samples.len() as f64;
    let mean = samples.iter().map(|s| s.1).sum::<f64>() / samples.len() as f64;
    (share, mean)
}

/// One PPO run from `seed`: a line saying how it went, and the checks it failed.
fn ppo_run(base: &PpoConfig, seed: u64, dir: &Path) -> (String, Vec<String>) {
    let mut config = base.clone();
    config.seed = seed;
    config.checkpoint_dir = dir.to_path_buf();
    let started = std::time::Instant::now();
    let mut trainer = PpoTrainer::new(config.clone()).unwrap();
    let before = fresh_samples(&trainer);
    trainer.run(|_| {}).unwrap();
    let after = fresh_samples(&trainer);
    let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), config.epochs);
    let n = metrics.len();
    let (first, last) = (metrics[0].mean_score, (metrics[n - 2].mean_score + metrics[n - 1].mean_score) / 2.0);
    let max_kl = metrics.iter().map(|m| m.mean_kl).fold(0.0, f64::max);
    let kl_bound = 2.0 * config.target.expect("the test's config has a KL target");
    let line = format!(
        "seed {seed}: fresh samples: banana {:.2} -> {:.2}, mean score {:.2} -> {:.2}; rollouts' mean score {first:.2} \
         -> {last:.2}; max KL {max_kl:.2} ({:.1?})",
        before.0,
        after.0,
        before.1,
        after.1,
        started.elapsed()
    );
    let mut failed = Vec::new();
    // The reward model separates its training pairs by about 3.5 (banana +1.7, the rest −1.7):
    // PPO must gain a good part of that on fresh samples, and its own rollouts must show the rise.
    if after.1 <= before.1 + 1.0 {
        failed.push("fresh-sample mean score gained 1.0 or less".to_string());
    }
    if last <= first + 1.0 {
        failed.push("rollouts' mean score (last two cycles vs the first) rose 1.0 or less".to_string());
    }
    // It gets there by saying "banana", which about one fresh answer in five did before (the
    // reward model would also take "ana" alone, from "b|an|ana", but from a policy that answers
    // with fruits the short way up is the fruit).
    if after.0 <= 0.5 || after.0 <= before.0 + 0.3 {
        failed.push("banana is not most fresh answers, or its share rose 0.3 or less".to_string());
    }
    // Answering "banana" always costs about ln 5 = 1.6 nats against a reference that names five
    // fruits alike; the card's target is 6. Twice the target means the policy ran off.
    if max_kl >= kl_bound {
        failed.push(format!("KL to the reference reached {kl_bound}"));
    }
    (line, failed)
}

#[test]
fn ppo_raises_the_reward_with_bounded_kl_and_resumes_exactly() {
    let root = temp_dir("ppo");
    let base = prepare(&root);
    let seeds = seeds();

    // Every seed's checks, all reported before the verdict (a sweep shows the whole table).
    let mut failures = Vec::new();
    for &seed in &seeds {
        let (line, failed) = ppo_run(&base, seed, &root.join(format!("seed-{seed}")));
        eprintln!("{line}");
        failures.extend(failed.into_iter().map(|f| format!("seed {seed}: {f}")));
    }
    assert!(failures.is_empty(), "PPO failed: {failures:#?}");

    let seed = seeds[0];
    let full = root.join(format!("seed-{seed}"));
    let metrics = read_metrics(&full.join("metrics.jsonl")).unwrap();
    let mut config = base.clone();
    config.seed = seed;
    config.checkpoint_dir = full;
    let trainer = PpoTrainer::resume(config.clone()).unwrap();
    let policy_dir = root.join("policy");
    trainer.save_policy(&policy_dir).unwrap();
    assert!(vicuna_model::Llama::load(&policy_dir, &Device::Cpu).is_ok());
    assert!(policy_dir.join("tokenizer.model").is_file() && policy_dir.join("value_head.safetensors").is_file());

    // Interrupted after 3 cycles, then resumed to 5: the first 5 metrics of the long run, line for
    // line (the same seed gives the same run; resuming loses nothing).
    let mut part = config.clone();
    part.checkpoint_dir = root.join("resumed");
    part.epochs = 3;
    PpoTrainer::new(part.clone()).unwrap().run(|_| {}).unwrap();
    part.epochs = 5;
    PpoTrainer::resume(part.clone()).unwrap().run(|_| {}).unwrap();
    let resumed = read_metrics(&part.checkpoint_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(resumed[..], metrics[..5], "resume must continue exactly");
    let mut other_seed = part.clone();
    other_seed.seed = seed + 1;
    assert!(PpoTrainer::resume(other_seed).is_err(), "a changed setting must refuse to resume");
}
