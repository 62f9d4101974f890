//! Damaged tokenizer files give an `Error` naming the file, never a panic.

mod common;

use common::{fixture, TempDir};
use std::path::Path;
use vicuna_tokenizer::{Error, Tokenizer};

fn load(dir: &TempDir, name: &str, bytes: &[u8]) -> Result<Tokenizer, Error> {
    let path = dir.write(name, bytes);
    Tokenizer::from_file(&path)
}

fn assert_error_names_file(result: Result<Tokenizer, Error>, name: &str, what: &str) {
    let err = result.expect_err(what);
    let msg = err.to_string();
    assert!(msg.contains(name), "{what}: {msg}");
    assert!(!msg.contains('\n'), "{what}: not one line: {msg}");
}

#[test]
fn truncated_tokenizer_model_is_an_error() {
    let bytes = std::fs::read(fixture("tokenizer.model")).unwrap();
    let dir = TempDir::new("truncated");
    let cuts = [0, 1, 2, 3, 10, 100, 1000, bytes.len() / 3, bytes.len() / 2, bytes.len() - 2, bytes.len() - 1];
    for cut in cuts.into_iter().chain((1..40).map(|k| bytes.len() * k / 40 + 7)) {
        assert_error_names_file(
            load(&dir, "tokenizer.model", &bytes[..cut]),
            "tokenizer.model",
            &format!("cut at {cut}"),
        );
    }
}

#[test]
fn from_bytes_loads_like_from_file_without_side_files() {
    for name in ["tokenizer.model", "tokenizer.json"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let dir = TempDir::new("from-bytes");
        let (held, read) = (Tokenizer::from_bytes(Path::new(name), &bytes).unwrap(), load(&dir, name, &bytes).unwrap());
        let text = "Hello world\n\u{4f60} 42";
        assert_eq!(held.encode(text, true), read.encode(text, true), "{name}");
        assert_eq!(held.vocab_size(), read.vocab_size(), "{name}");
    }
    assert_error_names_file(Tokenizer::from_bytes(Path::new("held.model"), b"\xff\xff"), "held.model", "bad varint");
}

/// Found by `fuzz/fuzz_targets/tokenizer_json.rs`: a vocabulary with gaps in its ids loaded, then encoded
/// text to ids past `vocab_size()` (id 5 of a 3-token vocabulary here), which decode to nothing and are
/// no row of the model's embedding.
#[test]
fn tokenizer_json_with_gaps_in_its_ids_is_an_error() {
    let json =
        br#"{"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1, "b": 5}, "merges": [], "unk_token": "<unk>"}}"#;
    let err = Tokenizer::from_bytes(Path::new("tokenizer.json"), json).unwrap_err().to_string();
    assert!(err.contains(r#"gives "b" id 5, but it has 3 tokens: ids must run from 0 without gaps"#), "{err}");
    let contiguous = String::from_utf8_lossy(json).replace(r#""b": 5"#, r#""b": 2"#);
    let tokenizer = Tokenizer::from_bytes(Path::new("tokenizer.json"), contiguous.as_bytes()).unwrap();
    assert_eq!(tokenizer.encode("ab", false), [1, 2]);
}

#[test]
fn garbage_is_an_error() {
    let dir = TempDir::new("garbage");
    let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    assert_error_names_file(load(&dir, "tokenizer.model", &noise), "tokenizer.model", "noise");
    assert_error_names_file(load(&dir, "tokenizer.model", b"\xff\xff\xff"), "tokenizer.model", "bad varint");
    assert_error_names_file(load(&dir, "tokenizer.model", b"hello world"), "tokenizer.model", "text");
    assert_error_names_file(load(&dir, "tokenizer.json", b"{\"version\": "), "tokenizer.json", "cut json");
    assert_error_names_file(load(&dir, "tokenizer.json", b"{}"), "tokenizer.json", "empty json");
    assert_error_names_file(load(&dir, "tokenizer.json", &noise), "tokenizer.json", "noise json");
    let json = std::fs::read(fixture("tokenizer.json")).unwrap();
    assert_error_names_file(load(&dir, "tokenizer.json", &json[..json.len() / 2]), "tokenizer.json", "half json");
    let missing = dir.path().join("missing.model");
    assert_error_names_file(Tokenizer::from_file(&missing), "missing.model", "missing");
}

#[test]
fn corrupted_bytes_never_panic() {
    let original = std::fs::read(fixture("tokenizer.model")).unwrap();
    let dir = TempDir::new("corrupt");
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Garble bytes near the start (piece headers), in the middle and in the
    // specs at the end; any outcome but a panic is fine, and a tokenizer that
    // still loads must encode and decode without panicking.
    for round in 0..60 {
        let mut bytes = original.clone();
        for _ in 0..1 + round % 5 {
            let region = match next() % 3 {
                0 => 0..200,
                1 => 0..bytes.len(),
                _ => bytes.len() - 300..bytes.len(),
            };
            let at = region.start + (next() as usize) % region.len();
            bytes[at] = next() as u8;
        }
        if let Ok(tok) = load(&dir, "tokenizer.model", &bytes) {
            let ids = tok.encode("Hello wörld 🦙 <s>\n", true);
            let _ = tok.decode(&ids);
        }
    }
}

#[test]
fn wrong_model_type_is_explained() {
    // Flip the trainer spec's model_type (field 3, varint 2 = BPE) to 1
    // (unigram): the message must say why the file is refused.
    let mut bytes = std::fs::read(fixture("tokenizer.model")).unwrap();
    let needle = [0x18u8, 0x02]; // key(3, varint), value 2
                                 // The trainer spec follows the 32000 pieces; search from the back.
    let pos = bytes.windows(2).rposition(|w| w == needle).unwrap();
    bytes[pos + 1] = 0x01;
    let dir = TempDir::new("unigram");
    let err = load(&dir, "tokenizer.model", &bytes).unwrap_err().to_string();
    assert!(err.contains("not BPE") && err.contains("tokenizer.model"), "{err}");
}
