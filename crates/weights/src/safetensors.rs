//! The safetensors format, read without trusting it.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names
//! to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the data that
//! follows the header), then the data. A truncated download, a hand-edited header or a
//! hostile file must produce an error naming the file and tensor, never an out-of-bounds
//! slice: every offset is checked against the data size, against the dtype × shape it
//! claims, and against its neighbours.

use crate::dtype::{DType, SUPPORTED_DTYPES};
use crate::error::{bail, Error, Result};
use serde_json::{Map, Value};
use std::ops::Range;
use std::path::Path;

/// One tensor of a safetensors file; `data` is its byte range in the whole file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Range<usize>,
}

/// The safetensors library refuses headers over 100 MB; so does vicuna (a 13B model's
/// header is ~30 KB). This keeps a lying length from allocating gigabytes.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// The dtype names of the safetensors format with their element sizes in bytes
/// (0 = packed sub-byte types, whose byte length is not simply numel × size).
const KNOWN_DTYPES: &[(&str, usize)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E5M2", 1),
    ("F8_E4M3", 1),
    ("F8_E8M0", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("F64", 8),
    ("I64", 8),
    ("U64", 8),
    ("C64", 8),
    ("F4", 0),
    ("F6_E2M3", 0),
    ("F6_E3M2", 0),
];

/// Parses the header of the safetensors file in `bytes` and checks it against the file.
/// Tensors for which `ignored(name)` holds are checked for layout but may have any known
/// dtype, and are not returned.
pub(crate) fn read_entries(bytes: &[u8], file: &Path, ignored: impl Fn(&str) -> bool) -> Result<Vec<Entry>> {
    let f = file.display();
    if bytes.len() < 8 {
        bail!(
            "{f} is too short ({} bytes) to be a safetensors file; the download is incomplete — download it again",
            bytes.len()
        );
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let available = (bytes.len() - 8) as u64;
    if header_len > MAX_HEADER || header_len > available {
        bail!(
            "{f}: safetensors header length {header_len} runs past the end of the file ({} bytes); \
             the file is truncated or not a safetensors file — download it again",
            bytes.len()
        );
    }
    let header_end = 8 + header_len as usize;
    let header = std::str::from_utf8(&bytes[8..header_end]).map_err(|_| {
        Error::new(format!("{f}: safetensors header is not UTF-8 text; the file is damaged — download it again"))
    })?;
    let header: Map<String, Value> = serde_json::from_str(header).map_err(|e| {
        Error::new(format!(
            "{f}: safetensors header is not a JSON object ({e}); the file is damaged — download it again"
        ))
    })?;
    let data_len = bytes.len() - header_end;

    let mut entries = Vec::new();
    // (begin, end, name) of every tensor, for the overlap check.
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (name, meta) in &header {
        if name == "__metadata__" {
            continue; // free-form string map, e.g. {"format": "pt"}
        }
        let bad = |what: &str| {
            Error::new(format!(
                "{f}: tensor {name} has {what} in the safetensors header; the file is damaged — download it again"
            ))
        };
        let Some(meta) = meta.as_object() else {
            return Err(bad("no dtype/shape/data_offsets object"));
        };
        let dtype_name = meta.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("no dtype"))?;
        let shape = meta
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("a shape that is not a list of non-negative integers"))?;
        let offsets = meta
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("no data_offsets pair"))?;

        let Some(&(_, elem_size)) = KNOWN_DTYPES.iter().find(|(n, _)| *n == dtype_name) else {
            bail!(
                "{f}: tensor {name} has unknown dtype {dtype_name:?}; the header is damaged or the file was \
                 written by a newer safetensors ({SUPPORTED_DTYPES})"
            );
        };
        let (begin, end) = offsets;
        if begin > end {
            bail!(
                "{f}: tensor {name} has reversed data_offsets [{begin}, {end}]; the header is damaged — download the file again"
            );
        }
        if end > data_len as u64 {
            bail!(
                "{f}: tensor {name} has data_offsets [{begin}, {end}] past the end of the data ({data_len} bytes); \
                 the file is truncated — download it again"
            );
        }
        let (begin, end) = (begin as usize, end as usize);
        if elem_size > 0 {
            let expected = shape.iter().try_fold(elem_size, |acc, &d| acc.checked_mul(d));
            if expected != Some(end - begin) {
                bail!(
                    "{f}: tensor {name} is {dtype_name} of shape {shape:?}, which needs {} bytes, but its \
                     data_offsets [{begin}, {end}] hold {}; the header is damaged — download the file again",
                    expected.map_or("more than usize::MAX".to_string(), |n| n.to_string()),
                    end - begin
                );
            }
        }
        spans.push((begin, end, name));
        if ignored(name) {
            continue;
        }
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                bail!("unsupported dtype {other} for tensor {name} in {f}; {SUPPORTED_DTYPES}")
            }
        };
        entries.push(Entry { name: name.clone(), dtype, shape, data: header_end + begin..header_end + end });
    }

    // No two tensors may share bytes (an empty tensor shares nothing).
    spans.retain(|(b, e, _)| b < e);
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((b0, e0, n0), (b1, e1, n1)) = (pair[0], pair[1]);
        if b1 < e0 {
            bail!(
                "{f}: tensors {n0} [{b0}, {e0}] and {n1} [{b1}, {e1}] overlap in the safetensors header; \
                 the file is damaged — download it again"
            );
        }
    }
    Ok(entries)
}
