//! The Hugging Face side files of a model folder: `added_tokens.json`,
//! `special_tokens_map.json` and `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// What the side files beside a tokenizer say. Missing files give defaults.
#[derive(Debug, Clone, Default)]
pub(crate) struct SideFiles {
    /// `added_tokens.json`: (text, id), sorted by id.
    pub added_tokens: Vec<(String, u32)>,
    /// The pad token's text, if a config names one.
    pub pad_token: Option<String>,
}

impl SideFiles {
    /// Reads the side files in `dir` (any of them may be missing).
    pub(crate) fn load(dir: &Path) -> Result<SideFiles> {
        let mut side = SideFiles::default();

        let path = dir.join("added_tokens.json");
        if let Some(json) = read_json(&path)? {
            let map = json
                .as_object()
                .ok_or_else(|| Error::in_file(&path, "expected a JSON object", r#"write it as {"[PAD]": 32000}"#))?;
            for (text, id) in map {
                let id = id.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                    Error::in_file(
                        &path,
                        format_args!("token {text:?} has id {id}, expected a non-negative integer"),
                        r#"write it as {"[PAD]": 32000}"#,
                    )
                })?;
                side.added_tokens.push((text.clone(), id));
            }
            side.added_tokens.sort_by_key(|&(_, id)| id);
        }

        // tokenizer_config.json takes precedence, as in transformers.
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if let Some(json) = read_json(&path)? {
                if side.pad_token.is_none() {
                    side.pad_token = json.get("pad_token").and_then(token_text);
                }
            }
        }
        Ok(side)
    }
}

/// A special token as the configs write it: a string, or an object with
/// "content"; null means none.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Parses a JSON file; `None` if it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::in_file(
                path,
                format_args!("cannot read ({e})"),
                "check permissions, or delete the file if it is not needed",
            ))
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::in_file(
            path,
            format_args!("invalid JSON ({e})"),
            "fix or re-download the file, or delete it if it is not needed",
        )
    })
}
