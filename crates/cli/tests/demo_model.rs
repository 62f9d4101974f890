//! The shipped demo chat model (models/demo/ship, made by models/demo/recipe.sh): `apply-delta` of
//! its base and delta rebuilds it, it knows the words it was taught (the reference is WordNet's own
//! definitions, in models/demo/ship/probe.jsonl), its quantized files keep its answers, and
//! transformers computes the same logits (where Python with torch and transformers is present).

mod binary;
use binary::python_with_transformers;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn vicuna() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vicuna"))
}

fn ship(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo/ship")).join(rel)
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("the vicuna binary runs");
    assert!(output.status.success(), "exit {:?}: {}", output.status.code(), String::from_utf8_lossy(&output.stderr));
    output
}

fn json(command: &mut Command) -> Value {
    serde_json::from_slice(&run(command).stdout).expect("JSON on stdout")
}

/// The chat model rebuilt once for all tests of this file: `apply-delta` of the shipped files.
fn chat_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under cargo's temporary folder for integration tests (inside target/), replaced on each run.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-model");
        run(vicuna()
            .args(["apply-delta", "--quiet", "--force", "--base"])
            .arg(ship("base"))
            .arg("--delta")
            .arg(ship("delta"))
            .arg("--target")
            .arg(&dir));
        dir
    })
}

struct Probe {
    prompt: String,
    chosen: String,
    rejected: String,
}

fn probes() -> Vec<Probe> {
    let text = std::fs::read_to_string(ship("probe.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let field = |k: &str| row[k].as_str().unwrap().to_string();
            Probe { prompt: field("prompt"), chosen: field("chosen"), rejected: field("rejected") }
        })
        .collect()
}

fn prompt_text(question: &str) -> String {
    format!("### Human: {question}\n### Assistant:")
}

fn ids(model: &Path, text: &str) -> Vec<u64> {
    let out = json(vicuna().args(["tokenize", "--json", "--text", text, "--model"]).arg(model));
    out["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// log p(" answer" | prompt) under `model`, the answer's tokens only.
fn answer_logprob(model: &Path, question: &str, answer: &str) -> f64 {
    let prompt = ids(model, &prompt_text(question));
    let full = ids(model, &format!("{} {answer}", prompt_text(question)));
    assert_eq!(&full[..prompt.len()], &prompt[..], "the prompt's tokens stay put");
    let list = full.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = json(vicuna().args(["score", "--json", "--ids", &list, "--model"]).arg(model));
    out["logprobs"].as_array().unwrap()[prompt.len()..].iter().map(|v| v.as_f64().unwrap()).sum()
}

#[test]
fn the_demo_model_prefers_true_definitions_of_its_words() {
    let model = chat_model();
    let probes = probes();
    assert_eq!(probes.len(), 50);
    let right = probes
        .iter()
        .filter(|p| answer_logprob(model, &p.prompt, &p.chosen) > answer_logprob(model, &p.prompt, &p.rejected))
        .count();
    // The recipe's evaluation (200 pairs) and this probe measured at least 90 %; the random
    // initial model is at chance (50 %).
    assert!(right >= 45, "the true definition wins {right} of 50 pairs");
}

#[test]
fn the_demo_model_answers_with_what_it_was_taught() {
    let model = chat_model();
    let probes = probes();
    let mut exact = 0;
    for p in &probes[..20] {
        let out = json(
            vicuna()
                .args(["generate", "--json", "--greedy", "--max-new-tokens", "64", "--prompt"])
                .arg(prompt_text(&p.prompt))
                .arg("--model")
                .arg(model),
        );
        assert_eq!(out["finish_reason"], "eos_token", "a one-sentence answer ends: {out}");
        exact += (out["text"].as_str().unwrap().trim() == p.chosen) as usize;
    }
    assert!(exact >= 10, "{exact} of 20 greedy answers are the taught definition word for word");
}

#[test]
fn quantized_demo_model_keeps_its_top_tokens() {
    let model = chat_model();
    let dir = model.with_extension("gguf-dir");
    std::fs::create_dir_all(&dir).unwrap();
    // In-domain text: the probe's conversations, as the model was trained on them.
    let text: String =
        probes().iter().map(|p| format!("### Human: {}\n### Assistant: {}\n", p.prompt, p.chosen)).collect();
    let text_file = dir.join("probe.txt");
    std::fs::write(&text_file, text).unwrap();
    let f16 = dir.join("f16.gguf");
    run(vicuna().args(["quantize", "--quiet", "--type", "f16", "--model"]).arg(model).arg("--out").arg(&f16));
    for (ty, floor) in [("q8_0", 0.98), ("q4_0", 0.85)] {
        let file = dir.join(format!("{ty}.gguf"));
        run(vicuna().args(["quantize", "--quiet", "--type", ty, "--model"]).arg(model).arg("--out").arg(&file));
        let out = json(
            vicuna()
                .args(["perplexity", "--json", "--kl-divergence", "--ctx", "128", "--model"])
                .arg(&file)
                .arg("--reference-model")
                .arg(&f16)
                .arg("--file")
                .arg(&text_file),
        );
        let same = out["top1_agreement"].as_f64().unwrap_or_else(|| panic!("top1_agreement in {out}"));
        assert!(same >= floor, "{ty}: top-1 agreement {same} with f16, floor {floor}: {out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transformers_loads_the_demo_model_with_the_same_logits() {
    let Some(python) = python_with_transformers() else {
        eprintln!("skipped: no Python with torch and transformers (set VICUNA_PYTHON to an interpreter that has them)");
        return;
    };
    let model = chat_model();
    let list: Vec<String> = ids(model, &prompt_text(&probes()[0].prompt)).iter().map(|i| i.to_string()).collect();
    let list = list.join(",");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_logits.py");
    let hf = Command::new(&python).arg(script).arg(model).arg(&list).output().unwrap();
    assert!(hf.status.success(), "transformers failed: {}", String::from_utf8_lossy(&hf.stderr));
    let hf: Value = serde_json::from_slice(&hf.stdout).unwrap();
    let ours = json(vicuna().args(["score", "--json", "--full-logits", "--ids", &list, "--model"]).arg(model));
    let (a, b) = (hf["last_logits"].as_array().unwrap(), ours["last_logits"].as_array().unwrap());
    assert_eq!((a.len(), b.len()), (32001, 32001));
    let worst = a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-4, "largest logit difference from transformers: {worst}");
}
