//! The reward model learns a synthetic preference (answers naming "banana" win), reports held-out
//! accuracy, and its saved folder scores exactly as the trained model did.

mod common;

use candle_core::Device;
use common::*;
use vicuna_train::reward::{reward_input, train_rm, RewardModel, RmOptions};

#[test]
fn reward_model_learns_the_preference_and_reloads() {
    let tok = tokenizer();
    let rm = RewardModel::from_causal_lm(&model_dir(), None, 5, &Device::Cpu).unwrap();
    let prefs = fruit_preferences(64);
    let opts = RmOptions { epochs: 2, lr: 2e-3, batch_size: 8, eval_fraction: 0.25, seed: 11, ..Default::default() };
    let mut losses = Vec::new();
    let report = train_rm(&rm, &tok, &prefs, &opts, |s| losses.push(s.loss)).unwrap();
    eprintln!("{report:?} losses {losses:.3?}");
    assert_eq!((report.train_pairs, report.eval_pairs), (48, 16));
    assert!(report.eval_accuracy_after.unwrap() >= 0.9, "{report:?}");
    assert!(report.eval_loss_after.unwrap() < 0.5, "{report:?}");

    let out = temp_dir("rm");
    rm.save(&out, &model_dir().join("config.json")).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    let reloaded = RewardModel::load(&out, &Device::Cpu).unwrap();
    let seqs: Vec<Vec<u32>> = prefs[..6].iter().map(|p| reward_input(&tok, &p.chosen_conversation(), 64)).collect();
    assert_eq!(reloaded.score_ids(&seqs, 4, 0).unwrap(), rm.score_ids(&seqs, 4, 0).unwrap());
    // Batching and padding do not change a score.
    let one_by_one: Vec<f64> = seqs.iter().flat_map(|s| rm.score_ids(std::slice::from_ref(s), 1, 0).unwrap()).collect();
    for (a, b) in one_by_one.iter().zip(rm.score_ids(&seqs, 6, 0).unwrap()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}
