//! Shared helpers for the integration tests: fixture paths, the expected
//! tokenization file, and scratch folders.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use vicuna_tokenizer::Tokenizer;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// `expected_tokenization.json`.
pub fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected_tokenization.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn cases() -> Vec<Value> {
    expected()["cases"].as_array().unwrap().clone()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

pub fn spm() -> Tokenizer {
    Tokenizer::from_file(&fixture("tokenizer.model")).unwrap()
}

pub fn json() -> Tokenizer {
    Tokenizer::from_file(&fixture("tokenizer.json")).unwrap()
}

/// Decodes `ids` one at a time through a stream decoder, plus the final flush.
pub fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut decoder = tok.stream_decoder();
    let mut text: String = ids.iter().map(|&id| decoder.push(id)).collect();
    text.push_str(&decoder.flush());
    text
}

/// A scratch folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vicuna-tokenizer-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A folder holding copies of the named fixture files.
    pub fn with_fixtures(label: &str, names: &[&str]) -> TempDir {
        let dir = TempDir::new(label);
        for name in names {
            std::fs::copy(fixture(name), dir.0.join(name)).unwrap();
        }
        dir
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
