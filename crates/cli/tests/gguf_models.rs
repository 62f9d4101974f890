//! Models run from GGUF files, end to end through the binary: `vicuna quantize` writes the tiny fixture
//! models as GGUF, and `vicuna score` / `generate` / `perplexity` / `bench` run them. Float GGUFs must give
//! transformers' logits (f32 within 1e-4, f16 within 1e-3) and its greedy tokens; quantized ones are held to
//! their KL divergence from the f32 file, measured by `vicuna perplexity --kl-divergence`.

mod binary;
#[path = "../../weights/tests/common/mod.rs"]
mod common;
#[path = "../../model/tests/expected/mod.rs"]
mod expected;

use std::path::{Path, PathBuf};

use binary::{path_str as s, stdout_json, vicuna};
use common::{fixture, TempDir};
use expected::{floats_of, ids_of};
use serde_json::Value;

/// `vicuna quantize --type ty` of a fixture folder into `dir`.
fn quantize(dir: &TempDir, model: &str, ty: &str, vocab: &[&str]) -> PathBuf {
    let out = dir.join(&format!("{}-{ty}.gguf", model.replace('/', "-")));
    let model = fixture(model);
    let args = [&["quantize", "--model", s(&model), "--type", ty, "--out", s(&out), "--quiet"][..], vocab].concat();
    let output = vicuna(&args);
    assert!(output.status.success(), "quantize {ty}: {}", String::from_utf8_lossy(&output.stderr));
    out
}

/// Every case of an expected-logits file through `score` (last logits) and `generate` (greedy tokens).
fn check_against_transformers(gguf: &Path, expected: &str, tolerance: f32) {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture(expected)).unwrap()).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let name = format!("{} {}", gguf.display(), case["name"]);
        let ids = ids_of(&case["input_ids"]);
        let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let scored = stdout_json(&vicuna(&["score", "--model", s(gguf), "--ids", &ids_arg, "--json", "--full-logits"]));
        let diff = floats_of(&scored["last_logits"])
            .iter()
            .zip(floats_of(&case["last_logits"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= tolerance, "{name}: last logits differ by {diff} (tolerance {tolerance})");

        let want = ids_of(&case["greedy_new_tokens"]);
        let n = want.len().to_string();
        let generated = stdout_json(&vicuna(&[
            "generate",
            "--model",
            s(gguf),
            "--ids",
            &ids_arg,
            "--greedy",
            "--ignore-eos",
            "--max-new-tokens",
            &n,
            "--json",
        ]));
        assert_eq!(ids_of(&generated["ids"]), want, "{name}: greedy tokens");
    }
}

#[test]
fn float_gguf_files_reproduce_transformers() {
    let dir = TempDir::new("gguf-float");
    for (variant, f16_folder) in [("tiny-a", "safetensors-f16"), ("tiny-b", "bin-sharded-f16")] {
        let f32_file = quantize(&dir, &format!("models/{variant}/safetensors-f32"), "f32", &["--synthetic-vocab"]);
        check_against_transformers(&f32_file, &format!("models/{variant}/expected_f32.json"), 1e-4);
        // The f16 fixtures are the f32 weights rounded to f16; their reference is transformers on them. (An f16
        // GGUF of the f32 folder is a third model: llama.cpp's converter keeps the norm vectors in f32.)
        let f16_file = quantize(&dir, &format!("models/{variant}/{f16_folder}"), "f16", &["--synthetic-vocab"]);
        check_against_transformers(&f16_file, &format!("models/{variant}/expected_f16.json"), 1e-3);
    }
}

/// The real LLaMA tokenizer travels inside the GGUF: `generate --prompt` needs nothing else.
#[test]
fn gguf_carries_its_tokenizer() {
    let dir = TempDir::new("gguf-tokenizer");
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let file = quantize(&dir, "models/tiny-v32001/safetensors-f16", "f32", &["--tokenizer", s(&tokenizer)]);
    check_against_transformers(&file, "models/tiny-v32001/expected_f16.json", 1e-4);
    let prompt = "### Human: What is a llama?\n### Assistant:";
    let args = ["--prompt", prompt, "--greedy", "--max-new-tokens", "8", "--json"];
    let from_gguf = stdout_json(&vicuna(&[&["generate", "--model", s(&file)][..], &args].concat()));
    let folder = fixture("models/tiny-v32001/safetensors-f16");
    let from_folder =
        stdout_json(&vicuna(&[&["generate", "--model", s(&folder), "--tokenizer", s(&tokenizer)][..], &args].concat()));
    assert_eq!(from_gguf["ids"], from_folder["ids"]);
    assert_eq!(from_gguf["text"], from_folder["text"]);
}

/// KL divergence from the f32 file over a real text, as `vicuna perplexity --kl-divergence` reports it.
#[test]
fn quantized_files_stay_close_to_f32() {
    let dir = TempDir::new("gguf-kld");
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let vocab = ["--tokenizer", s(&tokenizer)];
    let reference = quantize(&dir, "models/tiny-v32001/safetensors-f16", "f32", &vocab);
    let text = fixture("text/readme_excerpt.txt");
    let measure = |ty: &str| {
        let file = quantize(&dir, "models/tiny-v32001/safetensors-f16", ty, &vocab);
        let report = stdout_json(&vicuna(&[
            "perplexity",
            "--model",
            s(&file),
            "--file",
            s(&text),
            "--ctx",
            "128",
            "--kl-divergence",
            "--reference-model",
            s(&reference),
            "--json",
        ]));
        eprintln!("{ty}: {report}");
        (report["mean_kld"].as_f64().unwrap(), report["top1_agreement"].as_f64().unwrap(), report)
    };
    // f16 of weights that were f16 to begin with: the same numbers.
    let (kld, top1, report) = measure("f16");
    assert!(kld < 1e-9 && top1 == 1.0, "{report}");
    assert!(report["scored_tokens"].as_u64().unwrap() >= 500, "{report}");
    assert_eq!(report["perplexity"], report["reference_perplexity"]);
    // This random-weight model spreads its probability thinly over 32001 tokens (perplexity ~57000), so the
    // top-ranked token often leads by a hair: agreement is far below what a trained model shows, and the KL
    // divergence is the figure to hold quantization to.
    let (q8_kld, q8_top1, _) = measure("q8_0");
    let (q4km_kld, _, _) = measure("q4_k_m");
    let (q4_kld, _, _) = measure("q4_0");
    assert!(q8_kld < 5e-4 && q8_top1 >= 0.9, "q8_0: KLD {q8_kld}, top-1 {q8_top1}");
    assert!(
        q8_kld < q4km_kld && q4km_kld < q4_kld && q4_kld < 0.05,
        "KLD q8_0 {q8_kld}, q4_k_m {q4km_kld}, q4_0 {q4_kld}"
    );
}

#[test]
fn bench_reports_both_tests() {
    let dir = TempDir::new("gguf-bench");
    let file = quantize(&dir, "models/tiny-a/safetensors-f32", "q8_0", &["--synthetic-vocab"]);
    let report =
        stdout_json(&vicuna(&["-t", "1", "bench", "--model", s(&file), "-p", "16", "-n", "4", "-r", "2", "--json"]));
    for key in ["pp_tps", "pp_sd", "tg_tps", "tg_sd", "tg_weight_gb_per_s"] {
        assert!(report[key].as_f64().is_some_and(|v| v.is_finite() && v >= 0.0), "{key}: {report}");
    }
    assert!(report["pp_tps"].as_f64().unwrap() > 0.0 && report["tg_tps"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!((report["p"].as_u64(), report["n"].as_u64(), report["threads"].as_u64()), (Some(16), Some(4), Some(1)));
}

/// `--verify K` times k-row passes for k = 1..=K; `--lookup` / `--draft-model` add the speculative test `sg`.
/// The model drafting for itself must have every guess kept (greedy), which checks the counts are real.
#[test]
fn bench_times_verify_passes_and_speculation() {
    let dir = TempDir::new("gguf-bench-spec");
    let file = quantize(&dir, "models/tiny-a/safetensors-f32", "q8_0", &["--synthetic-vocab"]);
    let bench = |extra: &[&str]| {
        let args = [&["-t", "1", "bench", "--model", s(&file), "-p", "0", "-n", "12", "-r", "2", "--json"], extra];
        stdout_json(&vicuna(&args.concat()))
    };
    let report = bench(&["--verify", "3", "--lookup", "--draft-max", "4"]);
    let verify = report["verify"].as_array().expect("verify rows");
    assert_eq!(verify.iter().map(|r| r["k"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3], "{report}");
    assert!(verify.iter().all(|r| r["passes_per_s"].as_f64().unwrap() > 0.0), "{report}");
    assert!(report["sg_tps"].as_f64().unwrap() > 0.0 && report["tg_tps"].as_f64().unwrap() > 0.0, "{report}");
    let spec = &report["speculation"];
    assert_eq!((spec["guesser"].as_str(), spec["draft_max"].as_u64()), (Some("lookup"), Some(4)), "{report}");
    assert!(spec["drafted_tokens"].as_u64().unwrap() >= spec["accepted_tokens"].as_u64().unwrap(), "{report}");

    let report = bench(&["--draft-model", s(&file)]);
    let spec = &report["speculation"];
    assert_eq!(spec["guesser"], "draft-model", "{report}");
    assert!(spec["drafted_tokens"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(spec["drafted_tokens"], spec["accepted_tokens"], "a model agrees with itself: {report}");
    assert!(report.get("verify").is_none(), "{report}");
}

#[test]
fn bad_gguf_and_bad_flags_are_clear_errors() {
    let dir = TempDir::new("gguf-bad");
    let truncated = dir.join("cut.gguf");
    let whole = quantize(&dir, "models/tiny-a/safetensors-f32", "q8_0", &["--synthetic-vocab"]);
    let bytes = std::fs::read(&whole).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for args in [
        vec!["generate", "--model", s(&truncated), "--ids", "1,2", "--json"],
        vec!["bench", "--model", s(&whole), "-p", "4096"],
        vec!["bench", "--model", s(&whole), "--lookup", "--draft-max", "2", "--draft-min", "3"],
        vec!["perplexity", "--model", s(&whole), "--file", s(&dir.join("missing.txt"))],
    ] {
        let output = vicuna(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
