//! GGUF reading and writing: a file written by llama.cpp's own Python package (gguf-py) read back
//! against the values it wrote; writer → reader round trips of every metadata and tensor type; and
//! damaged or hostile files (every truncation, thousands of seeded corruptions, absurd counts,
//! lengths, dims and offsets) → one-line errors, never a panic or a huge allocation.

mod common;

use common::{expect_err, TempDir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use vicuna_kernels::{dequantize_row, quantize_row, row_size};
use vicuna_weights::{GgmlType, GgufFile, GgufTensorPlan, GgufValue, GgufValueType, GgufWriter};

fn data(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data")).join(name)
}

fn json_to_value(ty: &str, v: &Value, file_value: &GgufValue) -> GgufValue {
    // The JSON says the type for scalars; arrays take their element type from the file, which is
    // checked against the JSON values element by element.
    match ty {
        "uint8" => GgufValue::U8(v.as_u64().unwrap() as u8),
        "int8" => GgufValue::I8(v.as_i64().unwrap() as i8),
        "uint16" => GgufValue::U16(v.as_u64().unwrap() as u16),
        "int16" => GgufValue::I16(v.as_i64().unwrap() as i16),
        "uint32" => GgufValue::U32(v.as_u64().unwrap() as u32),
        "int32" => GgufValue::I32(v.as_i64().unwrap() as i32),
        "float32" => GgufValue::F32(v.as_f64().unwrap() as f32),
        "bool" => GgufValue::Bool(v.as_bool().unwrap()),
        "string" => GgufValue::String(v.as_str().unwrap().to_string()),
        "uint64" => GgufValue::U64(v.as_u64().unwrap()),
        "int64" => GgufValue::I64(v.as_i64().unwrap()),
        "float64" => GgufValue::F64(v.as_f64().unwrap()),
        "array" => {
            let GgufValue::Array(elem, items) = file_value else { panic!("expected an array, found {file_value:?}") };
            let want = v.as_array().unwrap();
            assert_eq!(items.len(), want.len());
            let elem_name = match elem {
                GgufValueType::Array => "array",
                other => other.name(),
            };
            GgufValue::Array(*elem, want.iter().zip(items).map(|(w, f)| json_to_value(elem_name, w, f)).collect())
        }
        other => panic!("unknown type {other}"),
    }
}

#[test]
fn reads_what_gguf_py_wrote() {
    let file = GgufFile::open(&data("gguf_reference.gguf")).unwrap();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(data("gguf_reference.json")).unwrap()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.get_str("general.architecture").unwrap(), Some("llama"));
    let metadata = reference["metadata"].as_array().unwrap();
    for entry in metadata {
        let key = entry["key"].as_str().unwrap();
        let found = file.get(key).unwrap_or_else(|| panic!("{key} missing"));
        let want = json_to_value(entry["type"].as_str().unwrap(), &entry["value"], found);
        assert_eq!(found, &want, "{key}");
    }
    // general.architecture comes first, then the test keys in the order written.
    assert_eq!(file.metadata().len(), metadata.len() + 1);
    assert_eq!(file.get("test.array_nested").unwrap().value_type(), GgufValueType::Array);

    let tensors = reference["tensors"].as_array().unwrap();
    assert_eq!(file.tensors().len(), tensors.len());
    for (t, want) in file.tensors().zip(tensors) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap());
        let dims: Vec<usize> = want["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims, dims);
        assert_eq!(t.data.as_ptr() as usize % 32, 0, "{} data is aligned in the map", t.name);
        let row_bytes = row_size(t.ty, t.row_len()).unwrap();
        let mut values = vec![0f32; t.numel()];
        for (src, dst) in t.data.chunks_exact(row_bytes).zip(values.chunks_exact_mut(t.row_len())) {
            dequantize_row(t.ty, src, dst).unwrap();
        }
        let want: Vec<f32> = want["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        // gguf-py dequantizes in numpy with the same f32 arithmetic: the values agree exactly.
        assert_eq!(values, want, "tensor {}", t.name);
    }
}

#[test]
fn from_bytes_reads_what_open_reads() {
    let path = data("gguf_reference.gguf");
    let (opened, held) =
        (GgufFile::open(&path).unwrap(), GgufFile::from_bytes(&path, std::fs::read(&path).unwrap()).unwrap());
    assert_eq!(held.metadata(), opened.metadata());
    assert_eq!(
        (held.version(), held.alignment(), held.data_offset()),
        (opened.version(), opened.alignment(), opened.data_offset())
    );
    for (a, b) in held.tensors().zip(opened.tensors()) {
        assert_eq!((a.name, a.ty, &a.dims, a.data), (b.name, b.ty, &b.dims, b.data));
        held.release(a.data).unwrap(); // owned bytes: nothing to release, and the data stays
        assert_eq!(a.data, b.data);
    }
    let short = GgufFile::from_bytes(Path::new("short.gguf"), b"GGUF".to_vec()).unwrap_err();
    assert_eq!(short.message(), "short.gguf is not a GGUF file: it is only 4 bytes long (a GGUF header alone is 24)");
}

fn every_metadata_type() -> Vec<(String, GgufValue)> {
    use GgufValue::*;
    vec![
        ("general.architecture".into(), String("llama".into())),
        ("t.u8".into(), U8(255)),
        ("t.i8".into(), I8(-128)),
        ("t.u16".into(), U16(65535)),
        ("t.i16".into(), I16(-32768)),
        ("t.u32".into(), U32(u32::MAX)),
        ("t.i32".into(), I32(i32::MIN)),
        ("t.f32".into(), F32(-0.1)),
        ("t.bool".into(), Bool(true)),
        ("t.string".into(), String("▁ünïcode <0x0A>".into())),
        ("t.u64".into(), U64(u64::MAX)),
        ("t.i64".into(), I64(i64::MIN)),
        ("t.f64".into(), F64(std::f64::consts::PI)),
        ("t.empty".into(), Array(GgufValueType::U8, vec![])),
        ("t.strings".into(), Array(GgufValueType::String, vec![String("a".into()), String("".into())])),
        (
            "t.nested".into(),
            Array(
                GgufValueType::Array,
                vec![Array(GgufValueType::I16, vec![I16(1), I16(-2)]), Array(GgufValueType::Bool, vec![Bool(false)])],
            ),
        ),
    ]
}

/// Writes a GGUF with `tensors` (ggml dims) holding deterministic pseudo-random rows; returns the
/// bytes written for each tensor.
fn write_test_file(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(&str, GgmlType, Vec<usize>)],
) -> Vec<Vec<u8>> {
    let plans: Vec<GgufTensorPlan> = tensors
        .iter()
        .map(|(name, ty, dims)| GgufTensorPlan { name: name.to_string(), ty: *ty, dims: dims.clone() })
        .collect();
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut writer = GgufWriter::create(dir, name, metadata, plans).unwrap();
    let mut all = Vec::new();
    let mut seed = 1u32;
    for (_, ty, dims) in tensors {
        let row_len = dims[0];
        let rows: usize = dims[1..].iter().product();
        let mut bytes = vec![0u8; row_size(*ty, row_len).unwrap() * rows];
        for row in bytes.chunks_exact_mut(row_size(*ty, row_len).unwrap()) {
            let values: Vec<f32> = (0..row_len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect();
            quantize_row(*ty, &values, row).unwrap();
        }
        // Written in uneven pieces, across tensor boundaries in no particular way.
        for piece in bytes.chunks(7) {
            writer.write(piece).unwrap();
        }
        all.push(bytes);
    }
    writer.finish().unwrap();
    all
}

fn standard_tensors() -> Vec<(&'static str, GgmlType, Vec<usize>)> {
    vec![
        ("a.f32", GgmlType::F32, vec![5, 3]),
        ("b.f16", GgmlType::F16, vec![7]),
        ("c.bf16", GgmlType::BF16, vec![4, 2, 3]),
        ("d.q8_0", GgmlType::Q8_0, vec![64, 3]),
        ("e.q4_0", GgmlType::Q4_0, vec![32, 5]),
        ("f.q4_K", GgmlType::Q4_K, vec![256, 2]),
        ("g.q6_K", GgmlType::Q6_K, vec![512, 1, 2, 1]),
        ("h.q5_1", GgmlType::Q5_1, vec![32, 1]),
    ]
}

#[test]
fn writer_round_trips_every_metadata_and_tensor_type() {
    let dir = TempDir::new("gguf-roundtrip");
    let path = dir.join("m.gguf");
    let metadata = every_metadata_type();
    let tensors = standard_tensors();
    let bytes = write_test_file(&path, &metadata, &tensors);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.metadata(), metadata.as_slice());
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset() % 32, 0);
    for ((name, ty, dims), want) in tensors.iter().zip(&bytes) {
        let t = file.tensor(name).unwrap();
        assert_eq!((t.ty, &t.dims), (*ty, dims));
        assert_eq!(t.data, want.as_slice(), "{name}");
        assert_eq!((t.data.as_ptr() as usize - file.tensors().next().unwrap().data.as_ptr() as usize) % 32, 0);
    }
    assert!(file.tensor("missing").is_none());
    // Version 2 has the same layout (64-bit counts and lengths): the same bytes read the same.
    let mut v2 = std::fs::read(&path).unwrap();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2_path = dir.join("v2.gguf");
    std::fs::write(&v2_path, &v2).unwrap();
    let old = GgufFile::open(&v2_path).unwrap();
    assert_eq!((old.version(), old.metadata()), (2, metadata.as_slice()));
    assert_eq!(old.tensor("g.q6_K").unwrap().data, bytes[6].as_slice());
    expect_err(file.get_str("t.u8"), &["t.u8", "must be a string"]);
    assert_eq!(file.get_usize("t.u16").unwrap(), Some(65535));
    expect_err(file.get_usize("t.i8"), &["t.i8", "non-negative integer"]);
    assert_eq!(file.get_f64("t.f32").unwrap(), Some(-0.1f32 as f64));

    // gguf-py reads our file too, when GGUF_PYTHON names a python with the `gguf` package (CI has
    // none; bench/gguf_interop.sh checks llama.cpp itself).
    if let Some(python) = std::env::var_os("GGUF_PYTHON") {
        let out = std::process::Command::new(&python)
            .args(["-c", "import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); print(len(r.tensors), len(r.fields))"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // gguf-py counts the three header fields as fields too.
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{} {}", tensors.len(), metadata.len() + 3));
    }
}

/// A small valid file for the damage tests: every metadata type and a few tensors.
fn small_valid_file(dir: &TempDir) -> Vec<u8> {
    let path = dir.join("valid.gguf");
    let tensors =
        vec![("a", GgmlType::F32, vec![4, 2]), ("b", GgmlType::Q4_0, vec![32, 2]), ("c", GgmlType::F16, vec![3])];
    write_test_file(&path, &every_metadata_type(), &tensors);
    std::fs::read(&path).unwrap()
}

/// Opens `bytes` as a GGUF and touches everything a loader would; must not panic.
fn open_bytes(dir: &TempDir, bytes: &[u8]) -> Result<(), vicuna_weights::Error> {
    let path = dir.join("probe.gguf");
    std::fs::write(&path, bytes).unwrap();
    let file = GgufFile::open(&path)?;
    for t in file.tensors() {
        let _ = t.data.iter().map(|&b| b as u64).sum::<u64>();
    }
    let _ = file.llama_config();
    let _ = file.vocab();
    Ok(())
}

#[test]
fn every_truncation_is_a_clear_error() {
    let dir = TempDir::new("gguf-truncate");
    let bytes = small_valid_file(&dir);
    open_bytes(&dir, &bytes).unwrap();
    // The zeros that pad the last tensor to the alignment hold nothing: a file cut among them still
    // has all its data. Every shorter cut must fail.
    let file = GgufFile::open(&dir.join("valid.gguf")).unwrap();
    let last = file.tensors().last().unwrap();
    let data_end = last.data.as_ptr() as usize + last.data.len()
        - file.tensors().next().unwrap().data.as_ptr() as usize
        + file.data_offset();
    assert!(bytes.len() - data_end < 32);
    for len in 0..data_end {
        let err = open_bytes(&dir, &bytes[..len]).expect_err(&format!("truncated to {len} bytes but opened"));
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.contains("truncated") || message.contains("not a GGUF file") || message.contains("past the end"),
            "truncated to {len}: {message}"
        );
    }
}

#[test]
fn seeded_corruptions_never_panic() {
    let dir = TempDir::new("gguf-corrupt");
    let bytes = small_valid_file(&dir);
    let header_end = GgufFile::open(&dir.join("valid.gguf")).unwrap().data_offset();
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut errors, mut opened) = (0, 0);
    for _ in 0..3000 {
        let mut damaged = bytes.clone();
        for _ in 0..1 + next() % 4 {
            // Mostly in the header, where the structure is.
            let at = (next() as usize) % header_end;
            damaged[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xFF,
                _ => damaged[at] ^ (1 << (next() % 8)),
            };
        }
        match open_bytes(&dir, &damaged) {
            Ok(()) => opened += 1,
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                errors += 1;
            }
        }
    }
    assert!(errors > 1000, "only {errors} of 3000 corruptions were caught ({opened} opened)");
}

/// Builds a GGUF header by hand: version, counts, then raw body bytes.
fn header(version: u32, tensors: u64, kvs: u64, body: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&tensors.to_le_bytes());
    out.extend_from_slice(&kvs.to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn tensor_info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut out = string(name);
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out
}

fn open_err(dir: &TempDir, bytes: &[u8], parts: &[&str]) -> String {
    let path = dir.join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    expect_err(GgufFile::open(&path), parts)
}

#[test]
fn absurd_headers_are_refused_before_allocating() {
    let dir = TempDir::new("gguf-absurd");
    let pad = vec![0u8; 64];
    open_err(&dir, &header(1, 0, 0, &pad), &["version 1", "not supported"]);
    open_err(&dir, &header(3u32.swap_bytes(), 0, 0, &pad), &["big-endian"]);
    open_err(&dir, &header(7, 0, 0, &pad), &["version 7"]);
    open_err(&dir, b"GGML0000000000000000000000000", &["not a GGUF file"]);
    open_err(&dir, &header(3, u64::MAX, 0, &pad), &["claims 18446744073709551615 tensors"]);
    open_err(&dir, &header(3, 0, u64::MAX / 2, &pad), &["metadata entries"]);

    // A key whose length runs past the end of the file.
    let mut body = (u64::MAX - 3).to_le_bytes().to_vec();
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["the key of metadata entry 0", "past the end"]);
    // A string value, and an array, claiming more than the file holds.
    let mut body = string("k");
    body.extend_from_slice(&8u32.to_le_bytes());
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["metadata k", "past the end"]);
    let mut body = string("arr");
    body.extend_from_slice(&9u32.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&(u64::MAX / 4).to_le_bytes());
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["metadata arr", "elements", "more than the rest of the file"]);
    // Arrays nested without end.
    let mut body = string("deep");
    body.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..40 {
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
    }
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["deep", "nests arrays"]);
    // An unknown value type, and a bool that is neither 0 nor 1.
    let mut body = string("k");
    body.extend_from_slice(&13u32.to_le_bytes());
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["value type 13"]);
    let mut body = string("k");
    body.extend_from_slice(&7u32.to_le_bytes());
    body.push(2);
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["bool stored as 2"]);
    // A wrong alignment.
    let mut body = string("general.alignment");
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&pad);
    open_err(&dir, &header(3, 0, 1, &body), &["general.alignment", "power of two"]);

    let tensor = |dims: &[u64], ty: u32, offset: u64| {
        let mut body = tensor_info("w", dims, ty, offset);
        body.extend_from_slice(&[0u8; 64]);
        header(3, 1, 0, &body)
    };
    open_err(&dir, &tensor(&[1 << 20, 1 << 20], 0, 0), &["tensor w", "past the end"]);
    open_err(&dir, &tensor(&[u64::MAX / 2, 4], 0, 0), &["tensor w"]);
    open_err(&dir, &tensor(&[1 << 62, 1 << 62, 1 << 62], 0, 0), &["tensor w", "overflow"]);
    open_err(&dir, &tensor(&[u64::MAX, 1], 0, 0), &["impossible dimension"]);
    open_err(&dir, &tensor(&[4, 1, 1, 1, 1], 0, 0), &["5 dimensions"]);
    open_err(&dir, &tensor(&[], 0, 0), &["0 dimensions"]);
    open_err(&dir, &tensor(&[4], 0, u64::MAX - 31), &["tensor w", "past the end"]);
    open_err(&dir, &tensor(&[4], 0, 7), &["not a multiple of the alignment 32"]);
    open_err(&dir, &tensor(&[32], 20, 0), &["iq4_nl", "does not read"]);
    open_err(&dir, &tensor(&[32], 1000, 0), &["id 1000"]);
    open_err(&dir, &tensor(&[33], 2, 0), &["tensor w", "q4_0"]);
    // Two tensors of the same name.
    let mut body = tensor_info("w", &[4], 0, 0);
    body.extend_from_slice(&tensor_info("w", &[4], 0, 32));
    body.extend_from_slice(&[0u8; 128]);
    open_err(&dir, &header(3, 2, 0, &body), &["tensor w appears twice"]);
}

#[test]
fn llama_metadata_is_checked() {
    let dir = TempDir::new("gguf-llama");
    let path = dir.join("m.gguf");
    let mut metadata = vec![("general.architecture".to_string(), GgufValue::String("gpt2".into()))];
    write_test_file(&path, &metadata, &[]);
    expect_err(GgufFile::open(&path).unwrap().llama_config(), &["general.architecture", "gpt2", "not llama"]);
    metadata[0].1 = GgufValue::String("llama".into());
    metadata.push(("llama.block_count".into(), GgufValue::U64(1 << 40)));
    write_test_file(&path, &metadata, &[("t", GgmlType::F32, vec![4])]);
    expect_err(GgufFile::open(&path).unwrap().llama_config(), &["llama.block_count is 1099511627776", "1 tensors"]);
    metadata.pop();
    metadata.push(("llama.block_count".into(), GgufValue::U32(0)));
    metadata.push(("llama.embedding_length".into(), GgufValue::U32(64)));
    write_test_file(&path, &metadata, &[]);
    expect_err(GgufFile::open(&path).unwrap().llama_config(), &["llama.attention.head_count", "missing"]);
    metadata.push(("llama.attention.head_count".into(), GgufValue::String("four".into())));
    write_test_file(&path, &metadata, &[]);
    expect_err(GgufFile::open(&path).unwrap().llama_config(), &["llama.attention.head_count", "non-negative integer"]);
    expect_err(GgufFile::open(&path).unwrap().vocab(), &["tokenizer.ggml.model is missing"]);
}
