//! `vicuna quantize` and `vicuna synth --type`, end to end: the tokenizer rebuilt from a GGUF's
//! vocabulary encodes like `tokenizer.model`; bad input exits 2 with one line and leaves no file;
//! an existing output is kept without `--force`.

mod binary;
#[path = "../../weights/tests/common/mod.rs"]
mod common;

use std::path::Path;

use binary::{assert_bad_input, assert_ok, path_str as s, vicuna};
use common::{fixture, TempDir};
use serde_json::Value;
use vicuna_tokenizer::Tokenizer;
use vicuna_weights::{GgmlType, GgufFile};

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

const TINY_V32001: &str = "models/tiny-v32001/safetensors-f16";

#[test]
fn tokenizer_from_gguf_encodes_like_tokenizer_model() {
    let dir = TempDir::new("quant-tok");
    let out = dir.join("m.gguf");
    let output = vicuna(&[
        "quantize",
        "--model",
        s(&fixture(TINY_V32001)),
        "--tokenizer",
        s(&fixture("tokenizer")),
        "--type",
        "q8_0",
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert_ok(&output);
    // The manifest: "<sha256>  m.gguf".
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.trim_end().ends_with("  m.gguf") && stdout.len() == 64 + 2 + 6 + 1, "{stdout}");

    let file = GgufFile::open(&out).unwrap();
    let vocab = file.vocab().unwrap();
    assert_eq!(vocab.tokens.len(), 32001);
    // tokenizer.model has 32000 pieces: the converter pads to the model's 32001 with an unused piece.
    assert_eq!((vocab.tokens[32000].as_str(), vocab.token_types[32000]), ("[PAD0]", 5));
    assert_eq!((vocab.bos_id, vocab.eos_id, vocab.unk_id), (Some(1), Some(2), Some(0)));
    assert!(vocab.add_bos && !vocab.add_eos && vocab.add_space_prefix);
    let rebuilt = Tokenizer::from_vocab_parts(
        vocab.tokens.clone(),
        vocab.scores.clone(),
        &vocab.token_types,
        [vocab.unk_id.unwrap(), vocab.bos_id.unwrap(), vocab.eos_id.unwrap()],
        vocab.pad_id,
        vocab.add_space_prefix,
    )
    .unwrap();
    let original = Tokenizer::from_file(&fixture("tokenizer/tokenizer.model")).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer/expected_tokenization.json")).unwrap())
            .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 33);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(rebuilt.encode(text, false), want, "{:?}", case["name"]);
        assert_eq!(rebuilt.encode(text, false), original.encode(text, false));
        assert_eq!(rebuilt.decode(&want), original.decode(&want), "{:?}", case["name"]);
    }
}

#[test]
fn added_tokens_become_user_defined_pieces() {
    // StableVicuna's [PAD] = 32000 from added_tokens.json, as llama.cpp's converter writes it.
    let dir = TempDir::new("quant-added");
    let tok = dir.join("tok");
    std::fs::create_dir(&tok).unwrap();
    std::fs::copy(fixture("tokenizer/tokenizer.model"), tok.join("tokenizer.model")).unwrap();
    std::fs::write(tok.join("added_tokens.json"), r#"{"[PAD]": 32000}"#).unwrap();
    let out = dir.join("m.gguf");
    assert_ok(&vicuna(&[
        "quantize",
        "--model",
        s(&fixture(TINY_V32001)),
        "--tokenizer",
        s(&tok),
        "--type",
        "f16",
        "--out",
        s(&out),
        "--quiet",
    ]));
    let vocab = GgufFile::open(&out).unwrap().vocab().unwrap();
    assert_eq!((vocab.tokens[32000].as_str(), vocab.token_types[32000], vocab.scores[32000]), ("[PAD]", 4, -1000.0));
    assert_eq!(vocab.pad_id, Some(32000));
    let rebuilt =
        Tokenizer::from_vocab_parts(vocab.tokens, vocab.scores, &vocab.token_types, [0, 1, 2], vocab.pad_id, true)
            .unwrap();
    // A user-defined piece is matched whole, as the original tokenizer with added_tokens.json does.
    let original = Tokenizer::from_file(&tok.join("tokenizer.model")).unwrap();
    for text in ["Hello[PAD]world", "[PAD] [PAD]x"] {
        assert_eq!(rebuilt.encode(text, false), original.encode(text, false), "{text}");
        assert!(rebuilt.encode(text, false).contains(&32000));
    }
}

#[test]
fn bad_input_exits_2_and_leaves_no_file() {
    let dir = TempDir::new("quant-bad");
    let out = dir.join("m.gguf");
    let model = fixture(TINY_V32001);
    let (missing, tokenizer_file) = (dir.join("missing"), fixture("tokenizer/tokenizer.model"));
    let (tiny_a, tokenizer_dir) = (fixture("models/tiny-a/safetensors-f32"), fixture("tokenizer"));
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model", s(&missing), "--type", "q4_0"], vec!["does not exist"]),
        (vec!["--model", s(&model), "--type", "q4_0"], vec!["tokenizer.model", "not found", "--tokenizer"]),
        (vec!["--model", s(&tokenizer_file), "--type", "q4_0"], vec!["not a GGUF file"]),
        (vec!["--model", s(&tiny_a), "--tokenizer", s(&tokenizer_dir), "--type", "q4_0"], vec!["32000 tokens", "512"]),
    ];
    for (args, parts) in cases {
        let mut all = vec!["quantize", "--out", s(&out), "--quiet"];
        all.extend(args);
        assert_bad_input(&vicuna(&all), &parts);
        assert!(entries(dir.path()).is_empty(), "{:?} left {:?}", all, entries(dir.path()));
    }
    // An unknown type is clap's usage error (exit 2 too), never a file.
    let output = vicuna(&["quantize", "--model", s(&model), "--type", "q3_k", "--out", s(&out)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(entries(dir.path()).is_empty());
    // The output's folder must exist.
    assert_bad_input(
        &vicuna(&[
            "quantize",
            "--model",
            s(&model),
            "--synthetic-vocab",
            "--type",
            "f16",
            "--out",
            s(&dir.join("no/m.gguf")),
        ]),
        &["parent folder", "does not exist"],
    );
}

#[test]
fn existing_output_is_kept_without_force() {
    let dir = TempDir::new("quant-force");
    let out = dir.join("m.gguf");
    std::fs::write(&out, b"precious").unwrap();
    let model = fixture("models/tiny-a/safetensors-f32");
    let args = ["quantize", "--model", s(&model), "--synthetic-vocab", "--type", "q4_k_m", "--out", s(&out), "--quiet"];
    assert_bad_input(&vicuna(&args), &["already exists", "--force"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut forced = args.to_vec();
    forced.push("--force");
    assert_ok(&vicuna(&forced));
    assert_eq!(entries(dir.path()), ["m.gguf"]);
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.tensor("blk.1.attn_v.weight").unwrap().ty, GgmlType::Q8_0);
}

#[test]
fn synth_writes_a_gguf_with_the_folders_weights() {
    let dir = TempDir::new("synth-gguf");
    let folder = dir.join("tiny");
    let gguf = dir.join("tiny.gguf");
    assert_ok(&vicuna(&["synth", "--shape", "tiny", "--dtype", "f32", "--seed", "7", "--out", s(&folder), "--quiet"]));
    assert_ok(&vicuna(&["synth", "--shape", "tiny", "--type", "f32", "--seed", "7", "--out", s(&gguf), "--quiet"]));
    // The same weights as the folder, converted by `vicuna quantize`.
    let via_quantize = dir.join("via.gguf");
    assert_ok(&vicuna(&[
        "quantize",
        "--model",
        s(&folder),
        "--synthetic-vocab",
        "--type",
        "f32",
        "--out",
        s(&via_quantize),
        "--quiet",
    ]));
    let (a, b) = (GgufFile::open(&gguf).unwrap(), GgufFile::open(&via_quantize).unwrap());
    assert_eq!(a.tensors().len(), 21);
    for (x, y) in a.tensors().zip(b.tensors()) {
        assert_eq!((x.name, x.ty, &x.dims, x.data), (y.name, y.ty, &y.dims, y.data));
    }
    assert_eq!(a.vocab().unwrap(), b.vocab().unwrap());
    let vocab = a.vocab().unwrap();
    assert_eq!(vocab.tokens[3 + 10], "<0x0A>");
    // --out FILE.gguf alone picks GGUF; the --dtype gives the type.
    let f16 = dir.join("f16.gguf");
    assert_ok(&vicuna(&["synth", "--shape", "tiny", "--out", s(&f16), "--quiet"]));
    assert_eq!(GgufFile::open(&f16).unwrap().tensor("token_embd.weight").unwrap().ty, GgmlType::F16);
}
