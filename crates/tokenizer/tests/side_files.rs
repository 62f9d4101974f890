//! Model folders: which file is loaded, and what the side files add.

mod common;

use common::{fixture, TempDir};
use vicuna_tokenizer::Tokenizer;

const ALL: &[&str] = &["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

#[test]
fn from_dir_prefers_tokenizer_model() {
    let dir = TempDir::with_fixtures("prefers-model", ALL);
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert!(tok.is_sentencepiece());

    let dir = TempDir::with_fixtures("json-only", &["tokenizer.json", "special_tokens_map.json"]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert!(!tok.is_sentencepiece());
    assert_eq!(tok.encode("Hello world", true), [1, 15043, 3186]);
}

#[test]
fn from_dir_without_tokenizer_is_none() {
    let dir = TempDir::with_fixtures("no-tokenizer", &["tokenizer_config.json"]);
    assert!(Tokenizer::from_dir(dir.path()).unwrap().is_none());
    let missing = dir.path().join("does-not-exist");
    let err = Tokenizer::from_dir(&missing).unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

#[test]
fn from_file_sniffs_the_format_when_the_name_does_not_tell() {
    let dir = TempDir::new("sniff");
    std::fs::copy(fixture("tokenizer.json"), dir.path().join("tok.bin")).unwrap();
    std::fs::copy(fixture("tokenizer.model"), dir.path().join("spm.bin")).unwrap();
    assert!(!Tokenizer::from_file(&dir.path().join("tok.bin")).unwrap().is_sentencepiece());
    assert!(Tokenizer::from_file(&dir.path().join("spm.bin")).unwrap().is_sentencepiece());
}

fn with_pad(label: &str, tokenizer_file: &str) -> (TempDir, Tokenizer) {
    let dir = TempDir::with_fixtures(label, ALL);
    dir.write("added_tokens.json", r#"{"[PAD]": 32000}"#);
    let tok = Tokenizer::from_file(&dir.path().join(tokenizer_file)).unwrap();
    (dir, tok)
}

#[test]
fn added_pad_token_extends_the_vocabulary() {
    for file in ["tokenizer.model", "tokenizer.json"] {
        let (_dir, tok) = with_pad("pad", file);
        assert_eq!(tok.vocab_size(), 32001, "{file}");
        assert_eq!(tok.pad_id(), Some(32000), "{file}");
        assert_eq!(tok.piece_to_id("[PAD]"), Some(32000), "{file}");
        assert_eq!(tok.id_to_piece(32000), Some("[PAD]"), "{file}");
        // Added tokens decode to their text, also when streamed.
        assert_eq!(tok.decode(&[15043, 32000, 3186]), "Hello[PAD] world", "{file}");
        assert_eq!(common::stream(&tok, &[15043, 32000, 3186]), "Hello[PAD] world", "{file}");
        // Their literal text in the input is the token; the text around it
        // is encoded separately, each part with its dummy prefix (as
        // transformers does): " world" becomes "▁▁world" = ▁ ▁world.
        assert_eq!(tok.encode("[PAD]", false), [32000], "{file}");
        assert_eq!(tok.encode("Hello[PAD] world", true), [1, 15043, 32000, 29871, 3186], "{file}");
        assert_eq!(tok.encode("Hello[PAD]world", true), [1, 15043, 32000, 3186], "{file}");
        assert_eq!(tok.encode("Hello [PAD][PAD]", false), [15043, 29871, 32000, 32000], "{file}");
        // Without the literal the encoding is unchanged.
        assert_eq!(tok.encode("Hello world", false), [15043, 3186], "{file}");
        assert_eq!(tok.bos_id(), 1);
        assert_eq!(tok.eos_id(), 2);
    }
}

#[test]
fn pad_token_named_by_the_config_wins() {
    let dir = TempDir::with_fixtures("pad-config", &["tokenizer.model"]);
    dir.write("tokenizer_config.json", r#"{"pad_token": {"content": "<unk>", "lstrip": false}}"#);
    dir.write("special_tokens_map.json", r#"{"bos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}"#);
    dir.write("added_tokens.json", r#"{"[PAD]": 32000}"#);
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(tok.pad_id(), Some(0));
    // StableVicuna's special_tokens_map names </s> as BOS; the model's ids win.
    assert_eq!(tok.bos_id(), 1);
    assert_eq!(tok.eos_id(), 2);
}

#[test]
fn bad_side_files_are_errors_naming_the_file() {
    let cases = [
        ("added_tokens.json", r#"{"[PAD]": 32001}"#, "added_tokens.json"), // gap
        ("added_tokens.json", r#"{"▁Hello": 5}"#, "added_tokens.json"),    // clashes
        ("added_tokens.json", r#"["[PAD]"]"#, "added_tokens.json"),
        ("added_tokens.json", r#"{"[PAD]": -1}"#, "added_tokens.json"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json"),
    ];
    for file in ["tokenizer.model", "tokenizer.json"] {
        for (name, contents, named) in cases {
            let dir = TempDir::with_fixtures("bad-side", &[file]);
            dir.write(name, contents);
            let err = Tokenizer::from_file(&dir.path().join(file)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(named), "{file} + {name}={contents}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }
}

#[test]
fn added_tokens_already_in_the_vocabulary_are_accepted() {
    let dir = TempDir::with_fixtures("added-existing", &["tokenizer.model", "tokenizer.json"]);
    dir.write("added_tokens.json", r#"{"</s>": 2, "[PAD]": 32000, "<|im_end|>": 32001}"#);
    for file in ["tokenizer.model", "tokenizer.json"] {
        let tok = Tokenizer::from_file(&dir.path().join(file)).unwrap();
        assert_eq!(tok.vocab_size(), 32002, "{file}");
        // Longest match first: "<|im_end|>" is one token.
        assert_eq!(tok.encode("Hi<|im_end|>[PAD]", false), [6324, 32001, 32000], "{file}");
    }
}
