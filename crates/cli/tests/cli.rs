//! The `vicuna` binary end to end: its output formats (an interface scripts read) against the
//! transformers / SentencePiece reference data, and every bad input giving exit code 2 with one
//! line on stderr — never a panic.

mod binary;
#[path = "../../weights/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use binary::{assert_bad_input, path_str, stdout_json, vicuna};
use common::{fixture, read_zip, write_zip, TempDir, ZipOptions};
use serde_json::Value;

fn expected(variant: &str, file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("models/{variant}/{file}"))).unwrap()).unwrap()
}

fn csv(v: &Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

const TINY_V32001: &str = "models/tiny-v32001/safetensors-f16";

#[test]
fn generate_json_gives_the_greedy_tokens_of_transformers() {
    for (variant, folder) in [("tiny-a", "bin-sharded-f16"), ("tiny-b", "safetensors-f32")] {
        let want = expected(variant, if folder.contains("f16") { "expected_f16.json" } else { "expected_f32.json" });
        let case = &want["cases"][1];
        let dir = fixture(&format!("models/{variant}/{folder}"));
        let out = vicuna(&[
            "generate",
            "--model",
            path_str(&dir),
            "--ids",
            &csv(&case["input_ids"]),
            "--greedy",
            "--ignore-eos",
            "--max-new-tokens",
            "20",
            "--json",
        ]);
        let got = stdout_json(&out);
        assert_eq!(got["ids"], case["greedy_new_tokens"], "{variant}/{folder}");
        assert_eq!(got["text"], Value::Null, "no tokenizer in the folder");
        assert_eq!(got["finish_reason"], "length");
    }
}

/// `--lookup` and `--draft-model` change how fast, not what: the same greedy tokens as transformers';
/// a draft with another vocabulary, or impossible limits, are refused with exit code 2.
#[test]
fn speculative_generate_gives_the_same_greedy_tokens() {
    let want = expected("tiny-a", "expected_f16.json");
    let case = &want["cases"][1];
    let dir = fixture("models/tiny-a/bin-sharded-f16");
    let draft = fixture("models/tiny-a/safetensors-f32");
    let ids = csv(&case["input_ids"]);
    let base = [
        "generate",
        "--model",
        path_str(&dir),
        "--ids",
        &ids,
        "--greedy",
        "--ignore-eos",
        "--max-new-tokens",
        "20",
        "--json",
    ];
    for extra in [vec!["--lookup"], vec!["--lookup", "--draft-max", "3"], vec!["--draft-model", path_str(&draft)]] {
        let got = stdout_json(&vicuna(&[&base[..], &extra[..]].concat()));
        assert_eq!(got["ids"], case["greedy_new_tokens"], "{extra:?}");
        assert!(got["drafted_tokens"].as_u64().unwrap() >= got["accepted_tokens"].as_u64().unwrap(), "{got}");
    }
    let other = fixture("models/tiny-b/safetensors-f32");
    assert_bad_input(
        &vicuna(&[&base[..], &["--draft-model", path_str(&other)]].concat()),
        &["--draft-model", "vocabulary"],
    );
    assert_bad_input(&vicuna(&[&base[..], &["--lookup", "--draft-max", "0"]].concat()), &["--draft-max"]);
}

#[test]
fn score_json_matches_transformers_logprobs() {
    let want = expected("tiny-a", "expected_f32.json");
    let case = want["cases"].as_array().unwrap().iter().find(|c| c.get("all_logits_row_major").is_some()).unwrap();
    let ids: Vec<usize> = case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let flat: Vec<f64> = case["all_logits_row_major"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let vocab = flat.len() / ids.len();
    let out = vicuna(&[
        "score",
        "--model",
        path_str(&fixture("models/tiny-a/bin-sharded-f32")),
        "--ids",
        &csv(&case["input_ids"]),
        "--json",
        "--full-logits",
    ]);
    let got = stdout_json(&out);
    let logprobs = got["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), ids.len());
    assert!(logprobs[0].is_null());
    let mut total = 0.0;
    for i in 1..ids.len() {
        // log_softmax of transformers' logits at position i-1, evaluated at token i.
        let row = &flat[(i - 1) * vocab..i * vocab];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        let want = row[ids[i]] - lse;
        let have = logprobs[i].as_f64().unwrap();
        assert!((have - want).abs() < 1e-4, "position {i}: {have} vs {want}");
        total += want;
    }
    let perplexity = (-total / (ids.len() - 1) as f64).exp();
    assert!((got["perplexity"].as_f64().unwrap() / perplexity - 1.0).abs() < 1e-4);
    let last: Vec<f64> = got["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let want_last = &flat[(ids.len() - 1) * vocab..];
    assert!(last.iter().zip(want_last).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn tokenize_and_detokenize_follow_sentencepiece() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer/expected_tokenization.json")).unwrap())
            .unwrap();
    let model = fixture(TINY_V32001);
    for tokenizer in ["tokenizer.model", "tokenizer.json"] {
        let tokenizer = fixture(&format!("tokenizer/{tokenizer}"));
        for case in cases["cases"].as_array().unwrap().iter().filter(|c| {
            let text = c["text"].as_str().unwrap();
            // (argv cannot carry NUL; text starting with '-' would read as a flag)
            !text.is_empty()
                && !text.contains('\0')
                && !text.contains("<s>")
                && !text.contains("</s>")
                && !text.starts_with('-')
        }) {
            let text = case["text"].as_str().unwrap();
            let out = vicuna(&[
                "tokenize",
                "--model",
                path_str(&model),
                "--tokenizer",
                path_str(&tokenizer),
                "--text",
                text,
                "--json",
            ]);
            let got = stdout_json(&out);
            assert_eq!(got["ids"], case["ids_with_bos"], "{text:?}");
            let out = vicuna(&[
                "detokenize",
                "--model",
                path_str(&model),
                "--tokenizer",
                path_str(&tokenizer),
                "--ids",
                &csv(&case["ids"]),
            ]);
            assert!(out.status.success());
            let decoded = String::from_utf8(out.stdout).unwrap();
            assert_eq!(decoded.strip_suffix('\n').unwrap(), case["decoded"].as_str().unwrap());
        }
    }
}

#[test]
fn streamed_text_equals_json_text() {
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let args = |json: bool| {
        let mut a = vec![
            "generate",
            "--model",
            path_str(Box::leak(Box::new(fixture(TINY_V32001)))),
            "--tokenizer",
            path_str(&tokenizer),
            "--prompt",
            "### Human: Hi!\n### Assistant:",
            "--max-new-tokens",
            "24",
            "--seed",
            "5",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        if json {
            a.push("--json".into());
        }
        a
    };
    let streamed = vicuna(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    let json = stdout_json(&vicuna(&args(true).iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(streamed.status.success());
    let streamed = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(streamed.strip_suffix('\n').unwrap(), json["text"].as_str().unwrap());
}

#[test]
fn every_subcommand_has_help() {
    for cmd in [vec!["--help"], vec!["generate", "--help"], vec!["score", "--help"], vec!["tokenize", "--help"]] {
        let out = vicuna(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}

// ------------------------------------------------------------------------------------ bad input

fn generate_ids(dir: &Path, ids: &str) -> Output {
    vicuna(&["generate", "--model", path_str(dir), "--ids", ids, "--max-new-tokens", "2"])
}

#[test]
fn missing_model_folder() {
    assert_bad_input(&generate_ids(Path::new("/nonexistent/model"), "1"), &["/nonexistent/model"]);
}

#[test]
fn missing_or_garbled_config() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["config.json"]);
    std::fs::write(dir.join("config.json"), "{\"vocab_size\": 512,").unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["config.json"]);
}

#[test]
fn non_llama_architecture() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config.replace("LlamaForCausalLM", "GPTNeoXForCausalLM").replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["GPTNeoXForCausalLM", "not LLaMA"]);
}

#[test]
fn shard_named_in_index_but_absent() {
    let dir = TempDir::copy_of("models/tiny-a/bin-sharded-f32");
    std::fs::remove_file(dir.join("pytorch_model-00003-of-00004.bin")).unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["pytorch_model-00003-of-00004.bin"]);
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replace("\"intermediate_size\": 172", "\"intermediate_size\": 170"))
        .unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["mlp", "170"]);
}

#[test]
fn truncated_safetensors() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["model.safetensors"]);
}

#[test]
fn safetensors_header_offsets_that_lie_or_overlap() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let first = header.as_object().unwrap().keys().find(|k| *k != "__metadata__").unwrap().clone();
    let second = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").nth(1).unwrap().clone();
    let rewrite = |edit: &dyn Fn(&mut Value)| {
        let mut h = header.clone();
        edit(&mut h);
        let h = serde_json::to_vec(&h).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        std::fs::write(dir.join("model.safetensors"), out).unwrap();
    };
    let past_end = data.len() as u64 + 64;
    rewrite(&|h| h[&first]["data_offsets"][1] = past_end.into());
    assert_bad_input(&generate_ids(dir.path(), "1"), &["model.safetensors"]);
    rewrite(&|h| h[&second]["data_offsets"] = h[&first]["data_offsets"].clone());
    assert_bad_input(&generate_ids(dir.path(), "1"), &["model.safetensors"]);
}

#[test]
fn unknown_dtype() {
    let dir = TempDir::copy_of("models/tiny-a/safetensors-f32");
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    // Same length, so the offsets stay valid: "F32" → "X32".
    let header = header.replacen("\"F32\"", "\"X32\"", 1);
    bytes[8..8 + header_len].copy_from_slice(header.as_bytes());
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    assert_bad_input(&generate_ids(dir.path(), "1"), &["X32"]);
}

#[test]
fn a_tokenizer_larger_than_the_model_is_refused() {
    // tiny-a has 512 embedding rows; the LLaMA tokenizer has 32000 tokens.
    let tiny_a = fixture("models/tiny-a/safetensors-f32");
    let tokenizer = fixture("tokenizer/tokenizer.model");
    for command in ["generate", "score"] {
        let flags = [command, "--model", path_str(&tiny_a), "--tokenizer", path_str(&tokenizer), "--ids", "1"];
        assert_bad_input(&vicuna(&flags), &["32000 tokens", "only 512", "own tokenizer"]);
    }
}

#[test]
fn token_ids_outside_the_vocabulary() {
    assert_bad_input(&generate_ids(&fixture("models/tiny-a/safetensors-f32"), "1,512"), &["512", "vocabulary"]);
    let out = vicuna(&[
        "detokenize",
        "--model",
        path_str(&fixture(TINY_V32001)),
        "--tokenizer",
        path_str(&fixture("tokenizer/tokenizer.model")),
        "--ids",
        "1,40000",
    ]);
    assert_bad_input(&out, &["40000"]);
}

#[test]
fn prompt_without_a_tokenizer() {
    let out = vicuna(&["generate", "--model", path_str(&fixture("models/tiny-a/safetensors-f32")), "--prompt", "hi"]);
    assert_bad_input(&out, &["no tokenizer", "--tokenizer"]);
}

#[test]
fn bad_sampling_values() {
    let model = fixture("models/tiny-a/safetensors-f32");
    for (flag, value, mentions) in [
        ("--temperature", "0", "--temperature"),
        ("--top-p", "1.5", "--top-p"),
        ("--top-p", "0", "--top-p"),
        ("--presence-penalty", "3", "--presence-penalty"),
        ("--frequency-penalty", "-2.5", "--frequency-penalty"),
        ("--logit-bias", "99999=1", "token id 99999"),
        ("--logit-bias", "5=-101", "between -100 and 100"),
    ] {
        let out = vicuna(&["generate", "--model", path_str(&model), "--ids", "1", flag, value]);
        assert_bad_input(&out, &[mentions]);
    }
    // A value clap cannot parse: its own usage error, exit code 2, saying the form.
    let out = vicuna(&["generate", "--model", path_str(&model), "--ids", "1", "--logit-bias", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not ID=BIAS"));
}

/// `--logit-bias ID=-100` bans a token: greedy decoding then never picks it, and the first token is the
/// runner-up of transformers' logits.
#[test]
fn logit_bias_bans_the_greedy_token() {
    let want = expected("tiny-a", "expected_f32.json");
    let case = &want["cases"][1];
    let first = case["greedy_new_tokens"][0].as_u64().unwrap();
    let model = fixture("models/tiny-a/safetensors-f32");
    let ids = csv(&case["input_ids"]);
    let ban = format!("{first}=-100");
    let args = ["generate", "--model", path_str(&model), "--ids", &ids, "--greedy", "--ignore-eos"];
    let out = vicuna(&[&args[..], &["--max-new-tokens", "12", "--json", "--logit-bias", &ban]].concat());
    let got = stdout_json(&out);
    let got: Vec<u64> = got["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(!got.contains(&first), "{got:?} has the banned {first}");
    // The runner-up at the first step, from transformers' last-position logits of the prompt.
    let logits: Vec<f64> = case["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(order[0] as u64, first);
    assert_eq!(got[0], order[1] as u64);
}

/// A `.bin` whose pickle calls `os.system` is refused before anything runs.
#[test]
fn pickle_that_names_os_system_is_refused_and_nothing_runs() {
    let dir = TempDir::copy_of("models/tiny-a/bin-sharded-f32");
    let witness = dir.join("pwned");
    let shard = dir.join("pytorch_model-00001-of-00004.bin");
    let entries = read_zip(&std::fs::read(&shard).unwrap());
    // PROTO 2; GLOBAL 'os system'; SHORT_BINUNICODE cmd; TUPLE1; REDUCE; STOP
    let command = format!("touch {}", witness.display());
    let mut pickle = vec![0x80, 2];
    pickle.extend_from_slice(b"cos\nsystem\n");
    pickle.push(0x8c);
    pickle.push(command.len() as u8);
    pickle.extend_from_slice(command.as_bytes());
    pickle.extend_from_slice(&[0x85, b'R', b'.']);
    let entries: Vec<(String, Vec<u8>)> = entries
        .into_iter()
        .map(|(name, data)| if name.ends_with("data.pkl") { (name, pickle.clone()) } else { (name, data) })
        .collect();
    write_zip(&shard, &entries, ZipOptions::default());
    let out = generate_ids(dir.path(), "1");
    assert_bad_input(&out, &[&format!("refusing to load pickle global os.system from {}", shard.display())]);
    assert!(!witness.exists(), "the pickled command ran");
}

// ------------------------------------------------------------------------- shared sampling flags

/// `vicuna chat` with `args`, one turn piped in: the reply.
fn chat_reply(args: &[&str]) -> String {
    use std::io::Write;
    let model = fixture(TINY_V32001);
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicuna"))
        .args(["chat", "--model", path_str(&model), "--tokenizer", path_str(&tokenizer), "--seed", "7"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is a llama?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `vicuna chat` in pipe mode keeps the conversation's KV cache between turns: from the second turn on, the whole
/// previous prompt comes from the cache and only the new part is computed; `/reset` starts from nothing. (That the
/// replies equal those computed from scratch is `vicuna-engine`'s `a_kept_context_…` test.)
#[test]
fn chat_reads_only_the_new_turn_from_the_second_turn_on() {
    use std::io::Write;
    let model = fixture(TINY_V32001);
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vicuna"))
        .args(["chat", "--model", path_str(&model), "--tokenizer", path_str(&tokenizer), "--greedy"])
        .args(["--max-new-tokens", "8"])
        .env("VICUNA_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let turns = ["What is a llama?", "And an alpaca?", "Which one is bigger?", "Thanks!", "/reset", "Hello again."];
    child.stdin.take().unwrap().write_all(turns.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // "turn: P prompt tokens, R from the cache, C computed"
    let counts: Vec<(usize, usize, usize)> = stderr
        .lines()
        .filter_map(|line| line.split("turn: ").nth(1))
        .map(|rest| {
            let numbers: Vec<usize> =
                rest.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
            (numbers[0], numbers[1], numbers[2])
        })
        .collect();
    assert_eq!(counts.len(), 5, "{stderr}");
    assert_eq!(counts[0].1, 0, "nothing cached before the first turn");
    for turn in 1..4 {
        let (prompt, reused, computed) = counts[turn];
        assert_eq!(prompt, reused + computed);
        assert!(reused >= counts[turn - 1].0, "turn {turn} recomputed the previous prompt: {counts:?}");
    }
    assert_eq!(counts[4].1, 0, "/reset forgets the cache: {counts:?}");
}

/// `vicuna generate --json` text of a seeded prompt with `args`.
fn generated(args: &[&str]) -> Value {
    let model = fixture(TINY_V32001);
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let base = ["generate", "--model", path_str(&model), "--tokenizer", path_str(&tokenizer), "--prompt", "Llamas"];
    stdout_json(&vicuna(&[&base[..], &["--seed", "7", "--ignore-eos", "--json"], args].concat()))
}

/// One set of sampling flags; chat samples at 0.7 for up to 512 tokens unless told otherwise,
/// generate at 1.0 for 256. The defaults are checked by what the commands do, not by their help.
#[test]
fn generate_and_chat_share_sampling_flags_with_their_own_defaults() {
    let flags = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--typical-p", "--repetition-penalty"];
    for command in ["generate", "chat"] {
        let help = String::from_utf8(vicuna(&[command, "--help"]).stdout).unwrap();
        for flag in flags.iter().chain(&["--seed", "--greedy"]) {
            assert!(help.contains(flag), "{command} --help lacks {flag}");
        }
    }

    let chat_default = chat_reply(&[]);
    assert_eq!(chat_default, chat_reply(&["--temperature", "0.7", "--max-new-tokens", "512"]));
    assert_ne!(chat_default, chat_reply(&["--temperature", "1.0", "--max-new-tokens", "512"]));

    let generate_default = generated(&[]);
    assert_eq!(generate_default["ids"].as_array().unwrap().len(), 256);
    assert_eq!(generate_default, generated(&["--temperature", "1.0", "--max-new-tokens", "256"]));
    assert_ne!(generate_default, generated(&["--temperature", "0.7", "--max-new-tokens", "256"]));

    // Both validate the same way.
    let model = fixture(TINY_V32001);
    let chat = vicuna(&[
        "chat",
        "--model",
        path_str(&model),
        "--tokenizer",
        path_str(&fixture("tokenizer/tokenizer.model")),
        "--top-p",
        "0",
    ]);
    assert_bad_input(&chat, &["--top-p"]);
}

/// `--json-schema` / `--regex`: the random-weight model's text is valid under the grammar; a bad grammar is a
/// one-line error.
#[test]
fn generate_with_structured_output() {
    let model = fixture(TINY_V32001);
    let tokenizer = fixture("tokenizer/tokenizer.model");
    let schema = r#"{"type":"object","properties":{"n":{"type":"integer","minimum":0,"maximum":9}},"required":["n"],"additionalProperties":false}"#;
    let base = ["generate", "--model", path_str(&model), "--tokenizer", path_str(&tokenizer), "--prompt", "JSON:"];
    for seed in ["1", "2", "3"] {
        let out = vicuna(
            &[&base[..], &["--json-schema", schema, "--seed", seed, "--max-new-tokens", "64", "--json"]].concat(),
        );
        let got = stdout_json(&out);
        let value: Value = serde_json::from_str(got["text"].as_str().unwrap()).unwrap();
        assert!(value["n"].as_u64().unwrap() <= 9, "{value}");
        assert_eq!(value.as_object().unwrap().len(), 1);
        assert_eq!(got["finish_reason"], "eos_token");
    }
    let out = vicuna(&[&base[..], &["--regex", "[a-c]{4}", "--max-new-tokens", "16", "--json"]].concat());
    let text = stdout_json(&out)["text"].as_str().unwrap().to_string();
    assert!(text.len() == 4 && text.chars().all(|c| ('a'..='c').contains(&c)), "{text:?}");
    let out = vicuna(&[&base[..], &["--regex", "[0-9"]].concat());
    assert_bad_input(&out, &["regex"]);
    let out = vicuna(&[&base[..], &["--json-schema", "{\"type\": \"nonsense\"}"]].concat());
    assert_bad_input(&out, &["json_schema"]);
}
