//! The streaming pieces behind apply-delta and synth: windowed reads, the sharded safetensors
//! writer, the temporary output folder, and synthetic models.

mod common;

use common::{expect_err, f32_bytes, fixture, state_dict_pickle, write_torch_zip, Rng, Spec, TempDir, ZipOptions};
use serde_json::Value;
use std::sync::atomic::AtomicBool;
use vicuna_weights::{
    run_synth, Checkpoint, DType, JobControl, LlamaConfig, Progress, ShardedWriter, StagedDir, SynthRequest,
    SynthShape, TensorSpec,
};

/// Reads every tensor of `ckpt` in windows of `window` bytes and compares with `bytes`.
fn assert_windows_match(ckpt: &Checkpoint, window: usize) {
    for name in ckpt.names() {
        let whole = ckpt.bytes(name).unwrap();
        let es = ckpt.info(name).unwrap().dtype.size_in_bytes();
        let window = window.div_ceil(es) * es;
        let mut at = 0;
        while at < whole.len() {
            let mut buf = vec![0u8; window.min(whole.len() - at)];
            ckpt.read_bytes_at(name, at, &mut buf).unwrap();
            assert_eq!(buf, whole[at..at + buf.len()], "{name} at {at}");
            at += buf.len();
        }
    }
}

#[test]
fn windowed_reads_equal_the_mapped_bytes() {
    for rel in ["delta/base", "delta/delta", "models/tiny-a/bin-sharded-f32", "models/tiny-b/safetensors-f32"] {
        let ckpt = Checkpoint::open(&fixture(rel)).unwrap();
        for window in [2, 14, 4096, 1 << 20] {
            assert_windows_match(&ckpt, window);
        }
    }
    // Strided PyTorch views (a transpose, every other row, a broadcast) through the map.
    let dir = TempDir::new("strided");
    let pickle = state_dict_pickle(&[
        Spec { name: "t", class: "FloatStorage", key: "0", numel: 24, offset: 12, shape: &[3, 2], stride: &[1, 3] },
        Spec { name: "rows", class: "FloatStorage", key: "0", numel: 24, offset: 16, shape: &[2, 2], stride: &[4, 1] },
        Spec { name: "b", class: "FloatStorage", key: "0", numel: 24, offset: 5, shape: &[3], stride: &[0] },
    ]);
    let storage = f32_bytes((0..24).map(|i| i as f32));
    write_torch_zip(&dir.join("pytorch_model.bin"), &pickle, &[("0", storage)], "little", ZipOptions::default());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for window in [4, 8, 12] {
        assert_windows_match(&ckpt, window);
    }
    let mut buf = [0u8; 8];
    ckpt.read_bytes_at("t", 8, &mut buf).unwrap();
    assert_eq!(buf, f32_bytes([13.0, 16.0])[..]);
    expect_err(ckpt.read_bytes_at("t", 20, &mut buf), &["t", "holds 24 bytes"]);
    expect_err(ckpt.read_bytes_at("nope", 0, &mut buf), &["no tensor named nope"]);
}

fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec { name: name.to_string(), dtype, shape: shape.to_vec() }
}

#[test]
fn sharded_writer_round_trips_through_the_reader() {
    let dir = TempDir::new("writer");
    // 400-byte shards: a (240 B) + b (160 B) fit; c (480 B) exceeds alone; d, the empty and the
    // scalar tensor follow in one more shard.
    let specs = vec![
        spec("a", DType::F32, &[6, 10]),
        spec("b", DType::F16, &[80]),
        spec("c", DType::BF16, &[2, 120]),
        spec("d", DType::F32, &[3]),
        spec("empty", DType::F16, &[0, 4]),
        spec("scalar", DType::F32, &[]),
    ];
    let mut rng = Rng::new(3);
    let data: Vec<Vec<u8>> =
        specs.iter().map(|s| (0..s.byte_len()).map(|_| (rng.next() % 251) as u8).collect()).collect();
    let mut writer = ShardedWriter::create(dir.path(), specs.clone(), 400, true).unwrap();
    assert_eq!(writer.shard_count(), 3);
    // Feed the data in odd chunks that straddle tensors and shards.
    let all: Vec<u8> = data.concat();
    for chunk in all.chunks(37) {
        writer.write(chunk).unwrap();
    }
    let written = writer.finish().unwrap();
    let names: Vec<&str> = written.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for (s, bytes) in specs.iter().zip(&data) {
        let info = ckpt.info(&s.name).unwrap();
        assert_eq!((info.dtype, &info.shape), (s.dtype, &s.shape), "{}", s.name);
        assert_eq!(ckpt.bytes(&s.name).unwrap().as_ref(), &bytes[..], "{}", s.name);
    }
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], all.len());
    assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
    assert_eq!(written.tensor_digests.unwrap().len(), specs.len());
    // Headers are padded so the data starts 8-byte aligned, as the safetensors library writes.
    for name in &names[..3] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0, "{name}");
    }

    // Too many or too few bytes are internal errors, never a silently short file.
    let dir = TempDir::new("writer-short");
    let mut writer = ShardedWriter::create(dir.path(), vec![spec("x", DType::F32, &[2])], 100, false).unwrap();
    writer.write(&[0; 4]).unwrap();
    expect_err(writer.finish(), &["x", "missing"]);
    let mut writer = ShardedWriter::create(dir.path(), vec![spec("x", DType::F32, &[2])], 100, false).unwrap();
    expect_err(writer.write(&[0; 9]), &["more bytes"]);
}

#[test]
fn staged_folder_is_renamed_into_place_or_removed() {
    let tmp = TempDir::new("staged");
    let target = tmp.join("out");
    // Dropped without commit: nothing stays.
    {
        let staged = StagedDir::create(&target, false).unwrap();
        std::fs::write(staged.path().join("x"), "1").unwrap();
        assert!(staged.path().starts_with(tmp.path()), "beside the target, on the same file system");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // Committed: in place, nothing else.
    let staged = StagedDir::create(&target, false).unwrap();
    std::fs::write(staged.path().join("x"), "1").unwrap();
    staged.commit().unwrap();
    assert_eq!(std::fs::read_to_string(target.join("x")).unwrap(), "1");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // A killed run's leftovers (folder and lock file, lock not held) are removed by the next run.
    let stale = tmp.join(".again.vicuna-partial-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model-00001-of-00002.safetensors"), "partial").unwrap();
    std::fs::write(tmp.join(".again.vicuna-partial-999999999.lock"), "").unwrap();
    let orphan = tmp.join(".again.vicuna-partial-888888888"); // killed before writing its lock
    std::fs::create_dir(&orphan).unwrap();
    let staged = StagedDir::create(&tmp.join("again"), false).unwrap();
    assert!(!stale.exists() && !orphan.exists());
    assert!(!tmp.join(".again.vicuna-partial-999999999.lock").exists());
    // ... but not one whose lock is held by a live writer.
    expect_err(StagedDir::create(&tmp.join("again"), false), &["another vicuna process is writing"]);
    drop(staged);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // Bad places.
    std::fs::write(tmp.join("file"), "").unwrap();
    expect_err(StagedDir::create(&tmp.join("file"), true), &["is not a folder"]);
    expect_err(StagedDir::create(&tmp.join("no/such/out"), false), &["parent folder", "does not exist"]);
}

struct Recorder(Vec<(String, u64)>, u64);

impl Progress for Recorder {
    fn phase(&mut self, what: &str, total: u64) {
        self.0.push((what.to_string(), total));
    }
    fn advance(&mut self, bytes: u64) {
        self.1 += bytes;
    }
}

fn synth(out: &std::path::Path, dtype: DType, seed: u64, threads: usize, shard_size: u64) -> Recorder {
    let request = SynthRequest {
        shape: SynthShape::Tiny,
        dtype,
        vocab: None,
        seed,
        out: out.to_path_buf(),
        force: false,
        shard_size,
        threads,
    };
    let cancel = AtomicBool::new(false);
    let mut progress = Recorder(Vec::new(), 0);
    run_synth(&request, &mut JobControl { cancel: &cancel, progress: &mut progress }).unwrap();
    progress
}

#[test]
fn synth_writes_a_valid_reproducible_model() {
    let tmp = TempDir::new("synth");
    let progress = synth(&tmp.join("a"), DType::F16, 5, 1, 1_000_000);
    synth(&tmp.join("b"), DType::F16, 5, 3, 300_000); // other threads and shards: same tensors
    synth(&tmp.join("c"), DType::F16, 6, 2, 1_000_000);
    let config = LlamaConfig::from_dir(&tmp.join("a")).unwrap();
    assert_eq!((config.vocab_size, config.hidden_size, config.num_hidden_layers), (32000, 64, 2));
    let (a, b, c) = (
        Checkpoint::open(&tmp.join("a")).unwrap(),
        Checkpoint::open(&tmp.join("b")).unwrap(),
        Checkpoint::open(&tmp.join("c")).unwrap(),
    );
    a.check_against(&config).unwrap();
    let total: u64 = a.names().iter().map(|n| a.info(n).unwrap().numel() as u64 * 2).sum();
    assert_eq!(progress.0, vec![("synth".to_string(), total)]);
    assert_eq!(progress.1, total);
    for name in a.names() {
        assert!(a.bytes(name).unwrap() == b.bytes(name).unwrap(), "{name}: the seed alone decides the values");
        let values = a.to_f32(name).unwrap();
        if name.ends_with("norm.weight") {
            assert!(values.iter().all(|&v| v == 1.0), "{name}");
            continue;
        }
        assert!(a.bytes(name).unwrap() != c.bytes(name).unwrap(), "{name}: another seed, other values");
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.002 && (std - 0.02).abs() < 0.001, "{name}: mean {mean}, std {std}");
        // Normal, not uniform: about 4.6% beyond two standard deviations.
        let tails = values.iter().filter(|v| v.abs() > 0.04).count() as f64 / n;
        assert!((0.035..0.057).contains(&tails), "{name}: {tails}");
    }
    // Every shape has the documented dimensions.
    for (shape, dims) in [
        (SynthShape::OneB, (2048, 5632, 22, 32, 4, 32000)),
        (SynthShape::SevenB, (4096, 11008, 32, 32, 32, 32000)),
        (SynthShape::ThirteenB, (5120, 13824, 40, 40, 40, 32001)),
    ] {
        let c = LlamaConfig::from_json_value(&shape.config_json(None, DType::F16), "synth").unwrap();
        let got = (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
        );
        assert_eq!(got, dims, "{shape:?}");
    }
    // float32 output holds the same draws unrounded.
    synth(&tmp.join("f32"), DType::F32, 5, 2, 1_000_000);
    let f = Checkpoint::open(&tmp.join("f32")).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let rounded: Vec<f32> = f.to_f32(name).unwrap().iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    assert_eq!(rounded, a.to_f32(name).unwrap());
}
