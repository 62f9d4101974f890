//! SFT on a tiny LLaMA (the 32001-token fixture with the real LLaMA tokenizer): the held-out loss
//! falls, LoRA trains only its adapters, and saved folders load back with the same logits.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use vicuna_model::Llama;
use vicuna_tokenizer::Tokenizer;
use vicuna_train::data::{Conversation, Turn};
use vicuna_train::params::{LoraSpec, TrainableLlama};
use vicuna_train::sft::{train_sft, SftOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-v32001/safetensors-f16")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.model")).unwrap()
}

/// "What color is the X?" → "The X is C." with a fixed color per thing: learnable structure.
fn chats(n: usize) -> Vec<Conversation> {
    let things = ["sky", "grass", "sun", "snow", "coal", "rose", "sea", "lemon"];
    let colors = ["blue", "green", "yellow", "white", "black", "red", "blue", "yellow"];
    (0..n)
        .map(|i| {
            let k = (i * 5 + i / 8) % things.len();
            Conversation {
                system: None,
                turns: vec![Turn {
                    user: format!("What color is the {}?", things[k]),
                    assistant: format!("The {} is {}.", things[k], colors[k]),
                }],
            }
        })
        .collect()
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicuna-train-sft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn sft_lowers_held_out_loss_and_the_saved_folder_reloads_identically() {
    let model = TrainableLlama::load(&model_dir(), None, 0, &Device::Cpu).unwrap();
    let opts = SftOptions {
        epochs: 3,
        lr: 3e-3,
        batch_size: 8,
        eval_fraction: 0.25,
        warmup_steps: 2,
        seed: 7,
        ..Default::default()
    };
    let mut losses = Vec::new();
    let report = train_sft(&model, &tokenizer(), &chats(48), &opts, |s| losses.push(s.loss)).unwrap();
    let (before, after) = (report.eval_loss_before.unwrap(), report.eval_loss_after.unwrap());
    eprintln!("held-out loss {before:.3} -> {after:.3} in {} steps; train losses {losses:.3?}", report.steps);
    assert_eq!((report.train_examples, report.eval_examples), (36, 12));
    assert!(after < before - 2.0, "held-out loss {before} -> {after}");

    let out = out_dir("full");
    model.save(&out, &model_dir().join("config.json"), false, candle_core::DType::F32).unwrap();
    let reloaded = Llama::load(&out, &Device::Cpu).unwrap();
    let ids = tokenizer().encode("### Human: What color is the sky?\n### Assistant:", true);
    assert_eq!(logits(&reloaded, &ids), logits(&model.frozen_model().unwrap(), &ids));
}

#[test]
fn lora_trains_only_adapters_and_merge_folds_them_in() {
    let spec = LoraSpec { rank: 4, alpha: 8.0, targets: vec!["q_proj".into(), "v_proj".into()] };
    let model = TrainableLlama::load(&model_dir(), Some(spec), 1, &Device::Cpu).unwrap();
    let vars = model.vars();
    assert_eq!(vars.len(), 2 * 2 * 2, "A and B for q_proj and v_proj in 2 layers");
    assert!(vars.iter().all(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B.")));
    let base_before: Vec<Vec<f32>> =
        model.base_weights().iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let opts = SftOptions { epochs: 1, lr: 1e-2, batch_size: 8, eval_fraction: 0.25, seed: 3, ..Default::default() };
    let report = train_sft(&model, &tokenizer(), &chats(32), &opts, |_| {}).unwrap();
    assert!(report.eval_loss_after.unwrap() < report.eval_loss_before.unwrap());
    let base_after: Vec<Vec<f32>> =
        model.base_weights().iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect();
    assert_eq!(base_before, base_after, "LoRA must leave the base weights alone");
    for (name, var) in &vars {
        let sum: f32 = var.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(sum > 0.0, "{name} did not train");
    }

    // Unmerged: the folder's weights are the base, bit for bit; the adapters sit beside them.
    let unmerged = out_dir("lora");
    model.save(&unmerged, &model_dir().join("config.json"), false, candle_core::DType::F32).unwrap();
    let base = Llama::load(&model_dir(), &Device::Cpu).unwrap();
    let saved = Llama::load(&unmerged, &Device::Cpu).unwrap();
    let ids = tokenizer().encode("### Human: What color is the sea?\n### Assistant:", true);
    assert_eq!(logits(&saved, &ids), logits(&base, &ids));
    let adapters = candle_core::safetensors::load(unmerged.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(adapters.len(), 8);
    assert!(adapters.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"));
    assert!(unmerged.join("adapter_config.json").is_file());

    // Merged: the folder alone computes what the adapted model computes.
    let merged = out_dir("merged");
    model.save(&merged, &model_dir().join("config.json"), true, candle_core::DType::F32).unwrap();
    let reloaded = Llama::load(&merged, &Device::Cpu).unwrap();
    assert_eq!(logits(&reloaded, &ids), logits(&model.frozen_model().unwrap(), &ids));
    assert_ne!(logits(&reloaded, &ids), logits(&base, &ids));
    assert!(!merged.join("adapter_model.safetensors").exists());
}
