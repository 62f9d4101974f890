//! apply-delta / make-delta against the reference made with numpy and transformers
//! (tests/fixtures/delta), and the arithmetic against exact float64 sums rounded once.

mod common;

use common::{expect_err, fixture, write_safetensors, Rng, TempDir};
use half::f16;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use vicuna_weights::{
    combine, run_delta, run_synth, Checkpoint, DType, DeltaOp, DeltaRequest, JobControl, Manifest, NoProgress,
    SynthRequest, SynthShape,
};

fn request(op: DeltaOp, base: &Path, other: &Path, out: &Path) -> DeltaRequest {
    DeltaRequest {
        op,
        base: base.to_path_buf(),
        other: other.to_path_buf(),
        out: out.to_path_buf(),
        force: false,
        verify: false,
        shard_size: 5_000_000_000,
        threads: 2,
    }
}

fn run(request: &DeltaRequest) -> vicuna_weights::Result<Manifest> {
    let cancel = AtomicBool::new(false);
    run_delta(request, &mut JobControl { cancel: &cancel, progress: &mut NoProgress })
}

fn expected_json() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("delta/expected_target.json")).unwrap()).unwrap()
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Names in `dir` that start with `.NAME.` — the temporary folders and locks of target NAME.
fn leftovers(parent: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// Every tensor of `got` equals the one of `want` bit for bit, and the names agree.
fn assert_same_tensors(got: &Checkpoint, want: &Checkpoint) {
    assert_eq!(got.names(), want.names());
    for name in want.names() {
        assert_eq!(got.info(name).unwrap().shape, want.info(name).unwrap().shape, "{name}");
        assert_eq!(got.info(name).unwrap().dtype, want.info(name).unwrap().dtype, "{name}");
        assert!(got.bytes(name).unwrap() == want.bytes(name).unwrap(), "{name} differs");
    }
}

/// The tensor names stored in the output's shards, read from the raw safetensors headers (the
/// reader hides `inv_freq` entries, so it cannot show that none was written).
fn stored_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
            names.extend(header.keys().filter(|k| *k != "__metadata__").cloned());
        }
    }
    names
}

#[test]
fn apply_delta_matches_the_reference_bit_for_bit() {
    let tmp = TempDir::new("apply");
    let out = tmp.join("stable-vicuna");
    let mut req = request(DeltaOp::Apply, &fixture("delta/base"), &fixture("delta/delta"), &out);
    req.shard_size = 100_000; // several shards even for this tiny model
    req.verify = true;
    let manifest = run(&req).unwrap();
    assert!(manifest.verified);

    let target = Checkpoint::open(&out).unwrap();
    // expected_target.safetensors is a single file: open it through a folder of its own.
    let want_dir = TempDir::new("expected");
    std::fs::copy(fixture("delta/expected_target.safetensors"), want_dir.join("model.safetensors")).unwrap();
    let want = Checkpoint::open(want_dir.path()).unwrap();
    assert_same_tensors(&target, &want);

    // The per-tensor sha256 of the reference JSON, independently of the reference file.
    let json = expected_json();
    let tensors = json["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), target.names().len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        assert_eq!(hex_sha256(&target.bytes(name).unwrap()), t["sha256"].as_str().unwrap(), "{name}");
    }

    // Sharded, with an index; inv_freq dropped; config = base's with vocab 301 and float16.
    let shards: Vec<_> = manifest.files.iter().filter(|f| f.name.ends_with(".safetensors")).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(stored_names(&out).iter().all(|n| !n.contains("inv_freq")));
    assert_eq!(stored_names(&out).len(), 21);
    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config, json["expected_config"]);
    let generation: Value =
        serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["bos_token_id"], 1);
    assert_eq!(generation["eos_token_id"], 2);
    // The delta's tokenizer files, byte for byte.
    for name in ["added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out.join(name)).unwrap(), std::fs::read(fixture("delta/delta").join(name)).unwrap());
    }
    // The manifest lists every file of the folder with its real sha256.
    let mut on_disk: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    on_disk.sort();
    let listed: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    assert_eq!(listed, on_disk);
    for file in &manifest.files {
        assert_eq!(file.sha256, hex_sha256(&std::fs::read(out.join(&file.name)).unwrap()), "{}", file.name);
    }
    assert!(leftovers(tmp.path(), "stable-vicuna").is_empty());
}

#[test]
fn broken_pairs_name_every_tensor_and_leave_nothing() {
    let json = expected_json();
    for case in ["delta-bad-shape", "delta-missing-tensor"] {
        let tmp = TempDir::new(case);
        let out = tmp.join("target");
        let reference = &json["failing_cases"][case];
        let tensor = reference["tensor"].as_str().unwrap();
        let message = expect_err(
            run(&request(DeltaOp::Apply, &fixture("delta/base"), &fixture(&format!("delta/{case}")), &out)),
            &[tensor, "nothing was written"],
        );
        if case == "delta-bad-shape" {
            assert!(message.contains("base shape [172, 64], delta shape [171, 64]"), "{message}");
        } else {
            assert!(message.contains("missing from the delta (base shape [64, 64])"), "{message}");
        }
        assert!(!out.exists(), "{case}: target written");
        assert!(leftovers(tmp.path(), "target").is_empty(), "{case}: {:?}", leftovers(tmp.path(), "target"));
    }
}

/// A folder with safetensors tensors `(name, shape, f16 values)` and a config.json for them.
fn write_model(dir: &Path, vocab: usize, tensors: &[(String, Vec<usize>, Vec<f16>)], extra: &[(&str, &[usize])]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(fixture("delta/base/config.json")).unwrap()).unwrap();
    config["vocab_size"] = vocab.into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let mut all: Vec<(String, &str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), "F16", s.clone(), v.iter().flat_map(|h| h.to_le_bytes()).collect()))
        .collect();
    for (name, shape) in extra {
        let n: usize = shape.iter().product();
        all.push((name.to_string(), "F32", shape.to_vec(), vec![0u8; n * 4]));
    }
    write_safetensors(&dir.join("model.safetensors"), &all);
}

/// Random f16 tensors of the fixture's shapes with vocabulary `vocab`.
fn random_tensors(vocab: usize, seed: u64, scale: f32) -> Vec<(String, Vec<usize>, Vec<f16>)> {
    let mut rng = Rng::new(seed);
    let config = vicuna_weights::LlamaConfig::from_dir(&fixture("delta/base")).unwrap();
    let config = vicuna_weights::LlamaConfig { vocab_size: vocab, ..config };
    config
        .expected_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| f16::from_f32(((rng.below(2001) as f32) - 1000.0) / 1000.0 * scale)).collect();
            (name, shape, values)
        })
        .collect()
}

/// The exact sum of two float16 values (float64 holds it exactly) rounded once to float16.
fn exact_f16_sum(a: f16, b: f16) -> f16 {
    f16::from_f64(a.to_f64() + b.to_f64())
}

#[test]
fn vocabulary_rule_equal_grown_and_refused() {
    let tmp = TempDir::new("vocab");
    let base_tensors = random_tensors(300, 1, 0.05);
    write_model(&tmp.join("base"), 300, &base_tensors, &[]);

    // Equal vocabularies: nothing appended, every element the rounded exact sum.
    let delta_tensors = random_tensors(300, 2, 0.01);
    write_model(&tmp.join("delta300"), 300, &delta_tensors, &[]);
    run(&request(DeltaOp::Apply, &tmp.join("base"), &tmp.join("delta300"), &tmp.join("t300"))).unwrap();
    let got = Checkpoint::open(&tmp.join("t300")).unwrap();
    for ((name, shape, b), (_, _, d)) in base_tensors.iter().zip(&delta_tensors) {
        assert_eq!(&got.info(name).unwrap().shape, shape);
        let got = got.to_f32(name).unwrap();
        for i in 0..b.len() {
            assert_eq!(got[i], exact_f16_sum(b[i], d[i]).to_f32(), "{name}[{i}]");
        }
    }

    // Delta one row larger: the base's rows are kept, the new row is the delta's row.
    let delta_tensors = random_tensors(302, 3, 0.01);
    write_model(&tmp.join("delta302"), 302, &delta_tensors, &[]);
    run(&request(DeltaOp::Apply, &tmp.join("base"), &tmp.join("delta302"), &tmp.join("t302"))).unwrap();
    let got = Checkpoint::open(&tmp.join("t302")).unwrap();
    let config: Value = serde_json::from_slice(&std::fs::read(tmp.join("t302/config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 302);
    for ((name, _, b), (_, shape, d)) in base_tensors.iter().zip(&delta_tensors) {
        assert_eq!(&got.info(name).unwrap().shape, shape);
        let got = got.to_f32(name).unwrap();
        for i in 0..d.len() {
            let base = b.get(i).copied().unwrap_or(f16::ZERO);
            assert_eq!(got[i].to_bits(), exact_f16_sum(base, d[i]).to_f32().to_bits(), "{name}[{i}]");
        }
    }

    // Base larger than the delta: refused, both vocabulary tensors named.
    expect_err(
        run(&request(DeltaOp::Apply, &tmp.join("delta302"), &tmp.join("base"), &tmp.join("bad"))),
        &["model.embed_tokens.weight: base shape [302, 64], delta shape [300, 64]", "lm_head.weight", "larger"],
    );
    assert!(!tmp.join("bad").exists());
}

#[test]
fn inv_freq_entries_are_dropped_on_either_side() {
    let tmp = TempDir::new("invfreq");
    let base_tensors = random_tensors(300, 4, 0.05);
    let delta_tensors = random_tensors(300, 5, 0.01);
    let inv_freq: [(&str, &[usize]); 2] = [
        ("model.layers.0.self_attn.rotary_emb.inv_freq", &[8]),
        ("model.layers.1.self_attn.rotary_emb.inv_freq", &[8]),
    ];
    // Base with the buffers, delta without; and the other way round.
    write_model(&tmp.join("base"), 300, &base_tensors, &inv_freq);
    write_model(&tmp.join("delta"), 300, &delta_tensors, &[]);
    run(&request(DeltaOp::Apply, &tmp.join("base"), &tmp.join("delta"), &tmp.join("a"))).unwrap();
    write_model(&tmp.join("base2"), 300, &base_tensors, &[]);
    write_model(&tmp.join("delta2"), 300, &delta_tensors, &inv_freq);
    run(&request(DeltaOp::Apply, &tmp.join("base2"), &tmp.join("delta2"), &tmp.join("b"))).unwrap();
    for out in ["a", "b"] {
        let names = stored_names(&tmp.join(out));
        assert_eq!(names.len(), base_tensors.len(), "{out}: {names:?}");
        assert!(names.iter().all(|n| !n.contains("inv_freq")), "{out}: {names:?}");
    }
    // The fixture's base (.bin) holds them too; covered by the reference test above.
}

#[test]
fn existing_target_is_refused_unless_forced() {
    let tmp = TempDir::new("force");
    let out = tmp.join("target");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let mut req = request(DeltaOp::Apply, &fixture("delta/base"), &fixture("delta/delta"), &out);
    expect_err(run(&req), &["already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "old");
    req.force = true;
    run(&req).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("config.json").is_file());
    assert!(leftovers(tmp.path(), "target").is_empty());

    // Never over an input: replacing it would delete the model being read.
    let req = DeltaRequest { out: fixture("delta"), force: true, ..req };
    expect_err(run(&req), &["holds the input"]);
    assert!(fixture("delta/base/config.json").is_file());
}

#[test]
fn make_delta_then_apply_delta_gives_back_the_target() {
    let tmp = TempDir::new("roundtrip");
    let expected = TempDir::new("roundtrip-expected");
    // The reference target as a model folder.
    for name in ["added_tokens.json", "special_tokens_map.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(fixture("delta/delta").join(name), expected.join(name)).unwrap();
    }
    std::fs::copy(fixture("delta/expected_target.safetensors"), expected.join("model.safetensors")).unwrap();

    let base_dir = fixture("delta/base");
    run(&request(DeltaOp::Make, &base_dir, expected.path(), &tmp.join("delta"))).unwrap();
    run(&request(DeltaOp::Apply, &base_dir, &tmp.join("delta"), &tmp.join("target"))).unwrap();

    let base = Checkpoint::open(&base_dir).unwrap();
    let delta = Checkpoint::open(&tmp.join("delta")).unwrap();
    let target = Checkpoint::open(expected.path()).unwrap();
    let again = Checkpoint::open(&tmp.join("target")).unwrap();
    let (mut exact, mut total) = (0usize, 0usize);
    for name in target.names() {
        let t = target.to_f32(name).unwrap();
        let d = delta.to_f32(name).unwrap();
        let r = again.to_f32(name).unwrap();
        let mut b = base.to_f32(name).unwrap();
        b.resize(t.len(), 0.0); // appended vocabulary rows
        for i in 0..t.len() {
            total += 1;
            // make-delta is float16 `t − b`: exact whenever that difference fits in float16
            // (then `b + d` is exactly `t` again). Otherwise `d` carries a rounding error of at
            // most half an ulp of `d`, and adding it back rounds once more: the result is within
            // ulp(d)/2 + ulp(r)/2 of `t` — one float16 ulp at the scale of the larger of |b|, |t|.
            // No float16 delta can do better there: b + d cannot hit t when |t| ≪ |b|.
            let difference_fits = f16::from_f64(t[i] as f64 - b[i] as f64).to_f64() == t[i] as f64 - b[i] as f64;
            if difference_fits {
                assert_eq!(r[i].to_bits(), t[i].to_bits(), "{name}[{i}]: exact difference must round-trip");
            } else {
                let bound = (ulp(d[i]) + ulp(r[i])) / 2.0;
                assert!((r[i] - t[i]).abs() <= bound, "{name}[{i}]: {} vs {} (bound {bound})", r[i], t[i]);
            }
            exact += usize::from(r[i].to_bits() == t[i].to_bits());
        }
    }
    // Weights and deltas of similar size: nearly every element comes back bit for bit.
    assert!(exact as f64 >= 0.99 * total as f64, "{exact} of {total} exact");
}

/// The spacing of float16 values at `x` (`x` holds a float16 value).
fn ulp(x: f32) -> f32 {
    let h = f16::from_f32(x.abs());
    (f16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()).abs()
}

#[test]
fn combine_rounds_like_one_exact_float16_operation() {
    let mut rng = Rng::new(7);
    let mut pairs: Vec<(u16, u16)> = (0..200_000).map(|_| (rng.next() as u16, rng.next() as u16)).collect();
    // Ties: a value plus half an ulp of itself (and of the other binade), at many exponents.
    for bits in (0x0400u16..0x7800).step_by(97) {
        let a = f16::from_bits(bits);
        let half_ulp = (f16::from_bits(bits + 1).to_f64() - a.to_f64()) / 2.0;
        pairs.push((bits, f16::from_f64(half_ulp).to_bits()));
        pairs.push((bits, f16::from_f64(-half_ulp).to_bits()));
    }
    // Extremes: overflow to infinity, subnormals, signed zeros.
    pairs.extend([(0x7bff, 0x7bff), (0x7bff, 0x5000), (0x0001, 0x0001), (0x8000, 0x0000), (0x8000, 0x8000)]);
    pairs.retain(|(a, b)| !f16::from_bits(*a).is_nan() && !f16::from_bits(*b).is_nan());
    let a: Vec<u8> = pairs.iter().flat_map(|(a, _)| a.to_le_bytes()).collect();
    let b: Vec<u8> = pairs.iter().flat_map(|(_, b)| b.to_le_bytes()).collect();
    for op in [DeltaOp::Apply, DeltaOp::Make] {
        let mut out = vec![0u8; a.len()];
        combine(op, &a, DType::F16, &b, DType::F16, &mut out);
        for (i, (x, y)) in pairs.iter().enumerate() {
            let (x, y) = (f16::from_bits(*x).to_f64(), f16::from_bits(*y).to_f64());
            let want = match op {
                DeltaOp::Apply => f16::from_f64(x + y),
                DeltaOp::Make => f16::from_f64(y - x),
            };
            let got = f16::from_bits(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]));
            assert_eq!(got.to_bits(), want.to_bits(), "{op:?} {x} {y}");
        }
    }
}

#[test]
fn float32_and_bfloat16_inputs_are_rounded_to_float16_first() {
    // What loading with torch_dtype=float16 does: each input becomes float16, then one float16 add.
    let mut rng = Rng::new(9);
    let a: Vec<f32> = (0..10_000).map(|_| (rng.next() as i64 as f64 / i64::MAX as f64) as f32 * 3.0).collect();
    let b: Vec<f32> = (0..10_000).map(|_| (rng.next() as i64 as f64 / i64::MAX as f64) as f32 * 0.01).collect();
    let a_bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
    let b16: Vec<u8> = b.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
    let mut out = vec![0u8; a.len() * 2];
    combine(DeltaOp::Apply, &a_bytes, DType::F32, &b16, DType::BF16, &mut out);
    for i in 0..a.len() {
        let want = exact_f16_sum(f16::from_f32(a[i]), f16::from_f32(half::bf16::from_f32(b[i]).to_f32()));
        assert_eq!(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]), want.to_bits(), "{i}");
    }
}

#[test]
fn float32_folders_and_mixed_formats_apply() {
    // A float32 safetensors base from synth and the fixture-shaped delta would not fit; use two
    // synth folders of the same shape, one f32 and one f16, the delta with a larger vocabulary.
    let tmp = TempDir::new("f32");
    let cancel = AtomicBool::new(false);
    let synth = |dtype, vocab, seed, out: PathBuf| {
        let request = SynthRequest {
            shape: SynthShape::Tiny,
            dtype,
            vocab: Some(vocab),
            seed,
            out,
            force: false,
            shard_size: 200_000,
            threads: 2,
        };
        run_synth(&request, &mut JobControl { cancel: &cancel, progress: &mut NoProgress }).unwrap();
    };
    synth(DType::F32, 1000, 1, tmp.join("base"));
    synth(DType::F16, 1001, 2, tmp.join("delta"));
    run(&request(DeltaOp::Apply, &tmp.join("base"), &tmp.join("delta"), &tmp.join("target"))).unwrap();
    let (base, delta) = (Checkpoint::open(&tmp.join("base")).unwrap(), Checkpoint::open(&tmp.join("delta")).unwrap());
    let target = Checkpoint::open(&tmp.join("target")).unwrap();
    for name in delta.names() {
        assert_eq!(target.info(name).unwrap().dtype, DType::F16);
        let (b, d, t) = (base.to_f32(name).unwrap(), delta.to_f32(name).unwrap(), target.to_f32(name).unwrap());
        for i in 0..d.len() {
            let b = b.get(i).map_or(f16::ZERO, |x| f16::from_f32(*x));
            assert_eq!(t[i].to_bits(), exact_f16_sum(b, f16::from_f32(d[i])).to_f32().to_bits(), "{name}[{i}]");
        }
    }
}
