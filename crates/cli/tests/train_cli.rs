//! `vicuna train sft|rm|ppo`, `vicuna reward` and `vicuna plot` end to end on the tiny 32001-token
//! fixture with the real tokenizer: each writes a complete folder that the other commands load,
//! leaves no temporary file behind, and bad input (a missing or malformed data file, a bad YAML
//! config) exits with code 2 and one line naming the file and line, writing nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> String {
    fixtures().join("models/tiny-v32001/safetensors-f16").display().to_string()
}

fn tokenizer() -> String {
    fixtures().join("tokenizer/tokenizer.model").display().to_string()
}

fn vicuna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vicuna")).args(args).output().expect("run vicuna")
}

fn ok_json(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {output:?}"))
}

/// Exit code 2, one `error:` line holding every part, nothing on stdout.
fn assert_bad_input(output: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for part in parts {
        assert!(lines[0].contains(part), "error lacks {part:?}: {stderr}");
    }
    assert!(output.stdout.is_empty(), "no output on stdout: {}", String::from_utf8_lossy(&output.stdout));
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vicuna-train-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn jsonl(rows: impl IntoIterator<Item = Value>) -> String {
    rows.into_iter().map(|r| r.to_string() + "\n").collect()
}

const PROMPTS: [&str; 4] = ["Name a fruit.", "Which fruit do you like?", "Pick a fruit.", "Say a fruit."];
const FRUITS: [&str; 4] = ["apple", "cherry", "grape", "lemon"];

fn chats(n: usize) -> String {
    jsonl((0..n).map(|i| json!({"prompt": PROMPTS[i % 4], "response": format!("{}.", FRUITS[(i / 4) % 4])})))
}

/// Answers naming "banana" are preferred.
fn preferences(n: usize) -> String {
    jsonl(
        (0..n)
            .map(|i| json!({"prompt": PROMPTS[i % 4], "chosen": "banana.", "rejected": format!("{}.", FRUITS[i % 4])})),
    )
}

/// Names of the files in `dir`, sorted; a temporary file left by an interrupted write would show.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// What a written model folder holds: config.json, `weights`, and the tokenizer files of the
/// --tokenizer file's folder (the fixture's four).
fn folder_files(weights: &[&str]) -> Vec<String> {
    let tokenizer = ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"];
    let mut names: Vec<String> =
        ["config.json"].iter().chain(weights).chain(&tokenizer).map(|s| s.to_string()).collect();
    names.sort();
    names
}

/// `vicuna score --json` of `ids` on a model folder: the command that reads any causal LM folder.
fn logprobs(model: &str, ids: &str) -> Value {
    ok_json(&vicuna(&["score", "--model", model, "--ids", ids, "--json"]))["logprobs"].clone()
}

#[test]
fn sft_then_rm_then_ppo_write_folders_the_other_commands_load() {
    let dir = TempDir::new("pipeline");
    let data = dir.write("chats.jsonl", &chats(24));
    let sft_out = dir.join("sft");
    let sft = path_str(&sft_out);
    let report = ok_json(&vicuna(&[
        "train",
        "sft",
        "--model",
        &model(),
        "--tokenizer",
        &tokenizer(),
        "--data",
        &data,
        "--out",
        sft,
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-fraction",
        "0.25",
        "--seed",
        "1",
    ]));
    assert_eq!((report["train_examples"].as_u64(), report["eval_examples"].as_u64()), (Some(18), Some(6)), "{report}");
    let (before, after) = (report["eval_loss_before"].as_f64().unwrap(), report["eval_loss_after"].as_f64().unwrap());
    assert!(after < before, "held-out loss {before} -> {after}");
    assert_eq!(files(&sft_out), folder_files(&["model.safetensors"]));
    // The folder loads on its own (its tokenizer included) and its weights changed.
    let trained = ok_json(&vicuna(&["tokenize", "--model", sft, "--text", "Name a fruit.", "--json"]));
    let ids = trained["ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
    assert_ne!(logprobs(sft, &ids), logprobs(&model(), &ids));

    let prefs = dir.write("prefs.jsonl", &preferences(32));
    let rm_out = dir.join("rm");
    let rm = path_str(&rm_out);
    let report = ok_json(&vicuna(&[
        "train",
        "rm",
        "--model",
        &model(),
        "--tokenizer",
        &tokenizer(),
        "--data",
        &prefs,
        "--out",
        rm,
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--eval-fraction",
        "0.25",
        "--seed",
        "2",
    ]));
    assert_eq!(report["eval_pairs"], 8, "{report}");
    assert!(report["eval_accuracy_after"].as_f64().unwrap() >= 0.75, "{report}");
    assert_eq!(files(&rm_out), folder_files(&["model.safetensors"]));
    let score = |response: &str| {
        ok_json(&vicuna(&["reward", "--model", rm, "--prompt", "Name a fruit.", "--response", response, "--json"]))
            ["score"]
            .as_f64()
            .unwrap()
    };
    assert!(score("banana.") > score("apple."), "the reward model prefers banana");
    // A reward model is not a language model, and says so.
    assert_bad_input(&vicuna(&["score", "--model", rm, "--ids", "1,2"]), &["is a reward model", "vicuna reward"]);

    let prompts = dir.write("prompts.jsonl", &jsonl(PROMPTS.iter().map(|p| json!({"prompt": p, "response": ""}))));
    let config = dir.write(
        "ppo.yaml",
        "train:\n  epochs: 2\n  batch_size: 4\n  seq_length: 48\n  seed: 3\nmethod:\n  num_rollouts: 8\n  \
         chunk_size: 4\n  ppo_epochs: 1\ngen_kwargs:\n  max_new_tokens: 4\noptimizer:\n  lr: 1.0e-4\n",
    );
    let ppo_out = dir.join("ppo");
    let out = ok_json(&vicuna(&[
        "train",
        "ppo",
        "--config",
        &config,
        "--model-path",
        sft,
        "--reward-model-path",
        rm,
        "--prompts-path",
        &prompts,
        "--checkpoint-dir",
        path_str(&ppo_out),
    ]));
    assert_eq!((out["cycles"].as_u64(), out["steps"].as_u64()), (Some(2), Some(4)), "{out}");
    let metrics = std::fs::read_to_string(ppo_out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    for line in metrics.lines() {
        let m: Value = serde_json::from_str(line).unwrap();
        assert!(m["mean_score"].as_f64().unwrap().is_finite() && m["mean_kl"].as_f64().unwrap().is_finite(), "{m}");
    }
    assert_eq!(files(&ppo_out), ["checkpoint", "curves.png", "metrics.jsonl", "policy"]);
    assert_eq!(files(&ppo_out.join("policy")), folder_files(&["model.safetensors", "value_head.safetensors"]));
    logprobs(path_str(&ppo_out.join("policy")), &ids);

    let png = dir.join("curves.png");
    let plotted = vicuna(&["plot", path_str(&ppo_out.join("metrics.jsonl")), "-o", path_str(&png)]);
    assert!(plotted.status.success(), "{}", String::from_utf8_lossy(&plotted.stderr));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(ppo_out.join("curves.png")).unwrap());
}

#[test]
fn sft_saves_float16_weights_that_are_the_float32_ones_rounded() {
    let dir = TempDir::new("save-dtype");
    let data = dir.write("chats.jsonl", &chats(8));
    let train = |out: &Path, dtype: &str| {
        ok_json(&vicuna(&[
            "train",
            "sft",
            "--model",
            &model(),
            "--tokenizer",
            &tokenizer(),
            "--data",
            &data,
            "--out",
            path_str(out),
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--eval-fraction",
            "0",
            "--seed",
            "1",
            "--save-dtype",
            dtype,
        ]))
    };
    let (f32_dir, f16_dir) = (dir.join("f32"), dir.join("f16"));
    train(&f32_dir, "f32");
    train(&f16_dir, "f16");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(f16_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float16");
    let (wide, narrow) =
        (vicuna_weights::Checkpoint::open(&f32_dir).unwrap(), vicuna_weights::Checkpoint::open(&f16_dir).unwrap());
    let names = narrow.names();
    assert_eq!(names.len(), wide.names().len());
    for name in names {
        assert_eq!(narrow.info(name).unwrap().dtype, vicuna_weights::DType::F16, "{name}");
        let (w, n) = (wide.to_f32(name).unwrap(), narrow.to_f32(name).unwrap());
        for (i, (w, n)) in w.iter().zip(&n).enumerate() {
            assert_eq!(half::f16::from_f32(*w).to_f32().to_bits(), n.to_bits(), "{name}[{i}]");
        }
    }
    let bad = vicuna(&["train", "sft", "--model", &model(), "--data", &data, "--out", "x", "--save-dtype", "f8"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--save-dtype"), "{bad:?}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `train sft` or `train rm` on `data`, expecting bad input and no output folder.
fn train_fails(stage: &str, dir: &TempDir, data: &str, parts: &[&str]) {
    let out = dir.join(&format!("out-{stage}"));
    let output = vicuna(&[
        "train",
        stage,
        "--model",
        &model(),
        "--tokenizer",
        &tokenizer(),
        "--data",
        data,
        "--out",
        path_str(&out),
    ]);
    assert_bad_input(&output, parts);
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

#[test]
fn bad_data_files_name_the_file_and_line() {
    let dir = TempDir::new("bad-data");
    let missing = dir.join("missing.jsonl").display().to_string();
    for stage in ["sft", "rm"] {
        train_fails(stage, &dir, &missing, &["cannot read", &missing]);
    }

    let good = chats(2);
    let broken = dir.write("broken.jsonl", &format!("{good}{{\"prompt\": \"Name a fruit.\"\n"));
    train_fails("sft", &dir, &broken, &[&format!("{broken}:3:"), "--skip-bad-rows"]);
    let not_json = dir.write("not_json.jsonl", &format!("{}[1, 2]\n", preferences(3)));
    train_fails("rm", &dir, &not_json, &[&format!("{not_json}:4:")]);

    // Rows of the wrong kind for the stage: SFT data holds no preference pairs.
    train_fails("rm", &dir, &dir.write("chats.jsonl", &good), &["no preference pairs"]);
}

#[test]
fn bad_ppo_configs_name_the_file_and_line() {
    let dir = TempDir::new("bad-yaml");
    let out = dir.join("ppo");
    let ppo = |config: &str| {
        vicuna(&["train", "ppo", "--config", config, "--model-path", &model(), "--checkpoint-dir", path_str(&out)])
    };
    let cases = [
        ("type.yaml", "train:\n  epochs: 2\n  batch_size: many\n", ":3:"),
        ("unknown.yaml", "method:\n  num_rollouts: 8\n  num_rollout: 4\n", ":3:"),
        ("no_colon.yaml", "train:\n  epochs 2\n", ":2:"),
    ];
    for (name, text, line) in cases {
        let config = dir.write(name, text);
        assert_bad_input(&ppo(&config), &[&format!("{config}{line}")]);
    }
    let missing = dir.join("missing.yaml").display().to_string();
    assert_bad_input(&ppo(&missing), &["cannot read", &missing]);
    // A flag with a bad value is named as the flag.
    let config = dir.write("ok.yaml", "train:\n  epochs: 2\n");
    assert_bad_input(
        &vicuna(&["train", "ppo", "--config", &config, "--cliprange", "wide", "--checkpoint-dir", path_str(&out)]),
        &["--cliprange"],
    );
    assert!(!out.exists(), "a failed run wrote {}", out.display());
}

/// `train ppo --help` lists a flag for every settings key (from the one list the YAML reader uses), each with
/// the form of its value.
#[test]
fn ppo_help_has_a_flag_per_key() {
    let out = vicuna(&["train", "ppo", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for key in vicuna_train::ppo_config::KEYS {
        let flag = format!("--{} <{}>", key.name.replace('_', "-"), key.value_name);
        assert!(help.contains(&flag) && help.contains(key.help), "{flag} missing from:\n{help}");
    }
    for flag in ["--max-length <N>", "--min-length <N>", "--betas <B1,B2>", "--scale-reward <none|running|ref>"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

/// An interpreter with torch and transformers: $VICUNA_PYTHON, else python3.
fn python_with_transformers() -> Option<String> {
    let python = std::env::var("VICUNA_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let probe = Command::new(&python).args(["-c", "import torch, transformers"]).output();
    probe.is_ok_and(|out| out.status.success()).then_some(python)
}

/// transformers reads what `train sft` and `train rm` write (as LlamaForCausalLM and
/// LlamaForSequenceClassification) and computes the same log-probabilities and scores.
#[test]
fn transformers_loads_the_trained_folders_and_agrees() {
    let Some(python) = python_with_transformers() else {
        eprintln!("skipped: no Python with torch and transformers (set VICUNA_PYTHON to an interpreter that has them)");
        return;
    };
    let dir = TempDir::new("hf");
    let (sft, rm) = (dir.join("sft"), dir.join("rm"));
    let common =
        ["--model", &model(), "--tokenizer", &tokenizer(), "--epochs", "1", "--lr", "3e-3", "--eval-fraction", "0"];
    let chats = dir.write("chats.jsonl", &chats(8));
    ok_json(&vicuna(&[&["train", "sft", "--data", &chats, "--out", path_str(&sft)], &common[..]].concat()));
    let prefs = dir.write("prefs.jsonl", &preferences(8));
    ok_json(&vicuna(&[&["train", "rm", "--data", &prefs, "--out", path_str(&rm)], &common[..]].concat()));

    let ids = "1,835,29950,1,5618,338,263,11203,29973,13,2277,29937";
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_logits.py");
    let hf = Command::new(&python).arg(script).arg(&sft).arg(ids).output().unwrap();
    assert!(hf.status.success(), "transformers failed: {}", String::from_utf8_lossy(&hf.stderr));
    let hf: Value = serde_json::from_slice(&hf.stdout).unwrap();
    for (i, (x, y)) in
        hf["logprobs"].as_array().unwrap().iter().zip(logprobs(path_str(&sft), ids).as_array().unwrap()).enumerate()
    {
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-3, "logprob {i}: transformers {x}, vicuna {y}"),
            (None, None) => {}
            other => panic!("logprob {i}: {other:?}"),
        }
    }

    let texts =
        ["### Human: Name a fruit.\n### Assistant: banana.\n", "### Human: Name a fruit.\n### Assistant: apple.\n"];
    let mut id_lists = Vec::new();
    let mut ours = Vec::new();
    for text in texts {
        let tokens = ok_json(&vicuna(&["tokenize", "--model", path_str(&rm), "--text", text, "--json"]));
        id_lists.push(tokens["ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
        let out = ok_json(&vicuna(&["reward", "--model", path_str(&rm), "--text", text, "--json"]));
        ours.push(out["score"].as_f64().unwrap());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_reward.py");
    let hf = Command::new(&python).arg(script).arg(&rm).args(&id_lists).output().unwrap();
    assert!(hf.status.success(), "transformers failed: {}", String::from_utf8_lossy(&hf.stderr));
    let hf: Value = serde_json::from_slice(&hf.stdout).unwrap();
    for (x, y) in hf["scores"].as_array().unwrap().iter().zip(&ours) {
        assert!((x.as_f64().unwrap() - y).abs() <= 1e-4, "transformers {x}, vicuna {y}");
    }
    eprintln!("transformers agrees with vicuna on the SFT and reward model folders ({python})");
}
