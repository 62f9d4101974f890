//! What the tests of the `vicuna` binary share: running it, and judging how it exited.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

pub fn vicuna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicuna")).args(args).output().expect("run vicuna")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn assert_ok(output: &Output) {
    assert!(output.status.success(), "exit {:?}: {}", output.status.code(), String::from_utf8_lossy(&output.stderr));
}

/// A successful run's stdout, one JSON object.
pub fn stdout_json(output: &Output) -> Value {
    assert_ok(output);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

/// Exit code 2, one `error:` line naming what is wrong, no panic, nothing on stdout.
pub fn assert_bad_input(output: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for part in parts {
        assert!(lines[0].contains(part), "error lacks {part:?}: {stderr}");
    }
    assert!(output.stdout.is_empty(), "no partial output on stdout");
}

/// The Python interpreter with torch and transformers, if this machine has one (`VICUNA_PYTHON`, else
/// `python3`).
pub fn python_with_transformers() -> Option<String> {
    let python = std::env::var("VICUNA_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let probe = Command::new(&python).args(["-c", "import torch, transformers"]).output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
        _ => None,
    }
}

/// `vicuna train sft` with LoRA (rank `rank` on `targets`, alpha 16) on 16 chats that name fruits, from the
/// tiny-v32001 fixture with the LLaMA tokenizer: the data written into `dir`, the adapter into `out` (`merge`:
/// folded into the saved weights as well).
pub fn train_fruit_adapter(dir: &Path, out: &Path, targets: &str, rank: &str, merge: bool) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let rows: String = ["an apple", "a cherry", "a grape", "a lemon"]
        .iter()
        .cycle()
        .take(16)
        .map(|fruit| {
            serde_json::json!({"prompt": "Name a fruit.", "response": format!("I like {fruit}.")}).to_string() + "\n"
        })
        .collect();
    let data = dir.join("fruit.jsonl");
    std::fs::write(&data, rows).unwrap();
    let (base, tokenizer) =
        (fixtures.join("models/tiny-v32001/safetensors-f16"), fixtures.join("tokenizer/tokenizer.model"));
    let mut args = vec!["train", "sft", "--model", path_str(&base), "--tokenizer", path_str(&tokenizer)];
    args.extend(["--data", path_str(&data), "--out", path_str(out), "--epochs", "2", "--batch-size", "4"]);
    args.extend(["--lr", "2e-2", "--seed", "5", "--lora-rank", rank, "--lora-alpha", "16", "--lora-targets", targets]);
    if merge {
        args.push("--merge");
    }
    assert_ok(&vicuna(&args));
}
