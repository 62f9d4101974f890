//! Reading the reference files that transformers wrote for the fixture models (`expected_*.json` beside each
//! model folder under tests/fixtures/models). Shared by the forward-pass tests of the model, the engine and the
//! binary (`#[path]`-included, as `crates/weights/tests/common` is).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// tests/fixtures/models.
pub fn models_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/models"))
}

/// `models_dir()/variant/file` as JSON, e.g. `("tiny-a", "expected_f32.json")`.
pub fn read_expected(variant: &str, file: &str) -> Value {
    let path = models_dir().join(variant).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
