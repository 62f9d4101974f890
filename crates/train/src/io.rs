//! Writing outputs safely: every file goes to a temporary name in its folder and is renamed into
//! place, so a crash never leaves a half-written file under the real name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        Error::new(format!("cannot move {} into place as {}: {e}", tmp.display(), path.display()))
    })
}

pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::new(format!("cannot write {}: {e}", tmp.display())))?;
    rename_into_place(&tmp, path)
}

pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::new(format!("cannot encode JSON: {e}")))?;
    text.push('\n');
    write_bytes_atomic(path, text.as_bytes())
}

/// A safetensors file of f32 tensors (contiguous copies are made as needed).
pub fn write_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_as(path, tensors, DType::F32)
}

/// A safetensors file of `dtype` tensors (f16 / bf16 round to nearest even, as torch's `.half()`).
pub fn write_safetensors_as(path: &Path, tensors: &[(String, Tensor)], dtype: DType) -> Result<()> {
    let mut map = HashMap::new();
    for (name, t) in tensors {
        map.insert(name.clone(), t.to_dtype(dtype)?.contiguous()?);
    }
    let tmp = temp_name(path);
    candle_core::safetensors::save(&map, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::new(format!("cannot write {}: {e}", tmp.display()))
    })?;
    rename_into_place(&tmp, path)
}

pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))
}

/// Tokenizer files a model folder carries; copied next to trained weights so the folder is
/// complete on its own.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
];

/// Copy the tokenizer files found in `from` (a folder) into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| Error::new(format!("cannot read {}: {e}", src.display())))?;
            write_bytes_atomic(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}
