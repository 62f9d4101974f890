//! `--lora DIR` of `generate`, `score`, `bench` and `chat` against an independent reference: an adapter that
//! `vicuna train sft --lora-rank` trained on the tiny fixture gives what the same run with `--merge` (the adapter
//! folded into the saved weights by the training code) gives, on f32 and on quantized base weights; and adapters
//! that do not fit are refused with exit code 2 and one line.

mod binary;
#[path = "../../weights/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use binary::{assert_bad_input, assert_ok, path_str as s, stdout_json, vicuna};
use common::{fixture, TempDir};
use serde_json::{json, Value};

/// The base model and the tokenizer, as arguments.
fn base() -> String {
    fixture("models/tiny-v32001/safetensors-f16").display().to_string()
}

fn tokenizer() -> String {
    fixture("tokenizer/tokenizer.model").display().to_string()
}

/// `vicuna train sft` with LoRA on a few chats, into `out` (`--merge`: the adapter folded in).
fn train(dir: &TempDir, out: &Path, targets: &str, rank: &str, merge: bool) {
    binary::train_fruit_adapter(dir.path(), out, targets, rank, merge);
}

const IDS: &str = "1,835,29871,13,1576,263,15774,29889,13,2277,29937";

/// BOS and 95 more ids spread over the vocabulary: enough scored positions for a mean to settle.
fn long_ids() -> String {
    let ids = std::iter::once(1).chain((1..96u32).map(|i| i * 7919 % 31990 + 3));
    ids.map(|id| id.to_string()).collect::<Vec<_>>().join(",")
}

/// `vicuna score` log-probabilities of [`long_ids`].
fn logprobs(args: &[&str]) -> Vec<f64> {
    let out = stdout_json(&vicuna(&[&["score", "--ids", &long_ids(), "--json"], args].concat()));
    out["logprobs"].as_array().unwrap().iter().filter_map(Value::as_f64).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn mean_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
}

fn greedy_ids(args: &[&str]) -> Value {
    let out = stdout_json(&vicuna(
        &[&["generate", "--ids", IDS, "--greedy", "--ignore-eos", "--max-new-tokens", "20", "--json"], args].concat(),
    ));
    out["ids"].clone()
}

#[test]
fn an_adapter_gives_what_the_merged_model_gives() {
    let dir = TempDir::new("lora-merged");
    let (adapter, merged) = (dir.join("adapter"), dir.join("merged"));
    let targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
    train(&dir, &adapter, targets, "4", false);
    train(&dir, &merged, targets, "4", true);
    let (base, tokenizer) = (base(), tokenizer());
    let lora = ["--model", &base, "--lora", s(&adapter)];

    // f32: the base (f16 file, computed in f32) plus the adapter against the merged f32 folder.
    let want = logprobs(&["--model", s(&merged)]);
    let got = logprobs(&lora);
    let moved = max_diff(&logprobs(&["--model", &base]), &want);
    assert!(moved > 1e-2, "training must move the model ({moved}) for this test to mean anything");
    let diff = max_diff(&got, &want);
    assert!(diff <= 1e-4, "with the adapter the log-probabilities are {diff} from the merged model's");
    assert_eq!(greedy_ids(&lora), greedy_ids(&["--model", s(&merged)]), "greedy tokens");

    // Quantized: the adapter on the q8_0 / q4_0 base file against the merged model quantized the same way, by the
    // mean distance of the log-probabilities from the f32 merged model's (quantizing moves each one by chance).
    for ty in ["q8_0", "q4_0"] {
        let (base_q, merged_q) = (dir.join(&format!("base.{ty}.gguf")), dir.join(&format!("merged.{ty}.gguf")));
        for (model, out) in [(PathBuf::from(&base), &base_q), (merged.clone(), &merged_q)] {
            let tok = &tokenizer;
            assert_ok(&vicuna(&["quantize", "--model", s(&model), "--type", ty, "--tokenizer", tok, "--out", s(out)]));
        }
        let err_adapter = mean_diff(&logprobs(&["--model", s(&base_q), "--lora", s(&adapter)]), &want);
        let err_merged = mean_diff(&logprobs(&["--model", s(&merged_q)]), &want);
        eprintln!("{ty}: mean |Δ logprob| base + adapter {err_adapter:.5}, merged {err_merged:.5}");
        assert!(
            err_adapter <= 1.25 * err_merged + 1e-3,
            "{ty}: base + adapter is {err_adapter} from the f32 merged model, the merged model quantized {err_merged}"
        );
    }

    // bench runs with the adapter too (its speed is not judged here).
    let bench = stdout_json(&vicuna(&[
        "bench",
        "--model",
        &base,
        "--lora",
        s(&adapter),
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--json",
    ]));
    assert_eq!(bench["lora"], json!(s(&adapter)), "{bench}");
    assert!(bench["tg_tps"].as_f64().unwrap() > 0.0, "{bench}");

    // perplexity with the adapter is the merged model's perplexity.
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "Name a fruit. apple. Pick a fruit. cherry. Say a fruit. grape. Which fruit? lemon. ".repeat(8),
    )
    .unwrap();
    let ppl = |args: &[&str]| {
        let out = stdout_json(&vicuna(&[&["perplexity", "--ctx", "32", "--json", "--file", s(&text)], args].concat()));
        out["perplexity"].as_f64().unwrap()
    };
    let (with_adapter, merged_ppl) =
        (ppl(&["--model", &base, "--tokenizer", &tokenizer, "--lora", s(&adapter)]), ppl(&["--model", s(&merged)]));
    assert!(
        (with_adapter / merged_ppl - 1.0).abs() < 1e-4,
        "perplexity {with_adapter} with the adapter, merged {merged_ppl}"
    );
    assert!(
        (ppl(&["--model", &base, "--tokenizer", &tokenizer]) / merged_ppl - 1.0).abs() > 1e-3,
        "the adapter matters"
    );
}

#[test]
fn adapters_that_do_not_fit_are_refused() {
    let dir = TempDir::new("lora-bad");
    let adapter = dir.join("adapter");
    train(&dir, &adapter, "q_proj,v_proj", "2", false);
    let (base, tokenizer) = (PathBuf::from(base()), tokenizer());
    let generate = |model: &Path, lora: &Path| {
        vicuna(&["generate", "--model", s(model), "--tokenizer", &tokenizer, "--ids", "1,2", "--lora", s(lora)])
    };
    assert_bad_input(&generate(&base, &dir.join("nowhere")), &["nowhere", "no such folder"]);
    // Trained on tiny-v32001 (hidden 32), given to tiny-a (hidden 64).
    let other = fixture("models/tiny-a/safetensors-f32");
    let output = vicuna(&["score", "--model", s(&other), "--ids", "1,2", "--lora", s(&adapter)]);
    assert_bad_input(&output, &["another base model"]);

    let config_path = adapter.join("adapter_config.json");
    let good = std::fs::read_to_string(&config_path).unwrap();
    let mut wrong_rank: Value = serde_json::from_str(&good).unwrap();
    wrong_rank["r"] = json!(8);
    std::fs::write(&config_path, wrong_rank.to_string()).unwrap();
    assert_bad_input(&generate(&base, &adapter), &["rank 2", "r = 8"]);
    std::fs::write(&config_path, good).unwrap();

    std::fs::remove_file(adapter.join("adapter_model.safetensors")).unwrap();
    assert_bad_input(&generate(&base, &adapter), &["adapter_model.safetensors is missing"]);
    let serve =
        |lora: &str| vicuna(&["serve", "--model", s(&base), "--tokenizer", &tokenizer, "--port", "0", "--lora", lora]);
    let output = serve(&format!("x={}", s(&adapter)));
    assert_bad_input(&output, &["--lora x", "adapter_model.safetensors is missing"]);
    let output = serve("no-equals-sign");
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
}
