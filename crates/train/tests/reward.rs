//! The reward model learns a synthetic preference (answers naming "banana" win), reports held-out
//! accuracy, and its saved folder scores exactly as the trained model did.

mod common;

use candle_core::Device;
use common::*;
use vicuna_model::Llama;
use vicuna_train::reward::{reward_input, train_rm, RewardModel, RmOptions};
use vicuna_weights::{Checkpoint, LlamaConfig};

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

/// A reward model folder passes the model-folder checks for its own head (`score.weight`, no
/// lm_head), while the causal-LM loader refuses it with one line saying what it is.
#[test]
fn reward_model_folder_is_checked_for_its_own_head() {
    let rm = RewardModel::from_causal_lm(&model_dir(), None, 5, &Device::Cpu).unwrap();
    let out = temp_dir("rm-head");
    rm.save(&out, &model_dir().join("config.json")).unwrap();
    let config = LlamaConfig::from_dir(&out).unwrap();
    let checkpoint = Checkpoint::open(&out).unwrap();
    checkpoint.check_against_score_head(&config, 1).unwrap();
    let err = checkpoint.check_against_score_head(&config, 2).unwrap_err().to_string();
    assert!(
        err.contains("score.weight in") && err.contains("has shape [1, 32] but config.json implies [2, 32]"),
        "{err}"
    );
    for err in [
        checkpoint.check_against(&config).unwrap_err().to_string(),
        Llama::load(&out, &Device::Cpu).err().unwrap().to_string(),
    ] {
        assert!(err.contains("is a reward model") && err.contains("vicuna reward") && !err.contains('\n'), "{err}");
    }

    // A causal LM is no reward model.
    let err = RewardModel::load(&model_dir(), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("no tensor score.weight"), "{err}");

    // Weights that do not fit: a wrong head shape and a stray tensor are both named.
    let mut tensors = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.insert(
        "score.weight".into(),
        candle_core::Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "value_head.weight".into(),
        candle_core::Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    let err = RewardModel::load(&out, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("2 problems")
            && err.contains("score.weight in")
            && err.contains("unexpected tensor value_head.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
