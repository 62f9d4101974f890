//! The `vicuna apply-delta`, `make-delta` and `synth` binaries, end to end: the reference result
//! of tests/fixtures/delta, refused inputs, interruptions (SIGINT, SIGTERM, SIGKILL), a full
//! disk, and the output running in `vicuna generate` and in Hugging Face transformers.

mod binary;
use binary::python_with_transformers;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use half::f16;
use serde_json::Value;
use vicuna_weights::Checkpoint;

fn vicuna() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vicuna"))
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vicuna-cli-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    command.borrow_mut().output().expect("the vicuna binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_ok(output: &Output) {
    assert!(output.status.success(), "exit {:?}: {}", output.status.code(), stderr(output));
}

/// The entries of `parent` that belong to target `name` other than itself: temporary folders and locks.
fn leftovers(parent: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// The reference target of tests/fixtures/delta as a model folder.
fn reference_target() -> (TempDir, Checkpoint) {
    let dir = TempDir::new("reference");
    std::fs::copy(fixture("delta/expected_target.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("delta/delta/config.json"), dir.join("config.json")).unwrap();
    let checkpoint = Checkpoint::open(&dir.0).unwrap();
    (dir, checkpoint)
}

fn apply(base: &Path, delta: &Path, target: &Path) -> Command {
    let mut command = vicuna();
    command.arg("apply-delta").arg("--base").arg(base).arg("--delta").arg(delta).arg("--target").arg(target);
    command
}

#[test]
fn apply_delta_gives_the_reference_and_the_target_generates() {
    let tmp = TempDir::new("apply");
    let target = tmp.join("stable-vicuna");
    let output = run(apply(&fixture("delta/base"), &fixture("delta/delta"), &target).args([
        "--verify",
        "--shard-size",
        "100KB",
    ]));
    assert_ok(&output);

    let (_reference_dir, reference) = reference_target();
    let got = Checkpoint::open(&target).unwrap();
    assert_eq!(got.names(), reference.names());
    for name in reference.names() {
        assert!(got.bytes(name).unwrap() == reference.bytes(name).unwrap(), "{name} differs from the reference");
    }
    // stdout is the manifest: one "sha256  file" line per file of the folder.
    let manifest = String::from_utf8(output.stdout.clone()).unwrap();
    let mut files: Vec<String> =
        std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let listed: Vec<&str> = manifest.lines().map(|l| l.split_once("  ").unwrap().1).collect();
    assert_eq!(listed, files);
    assert!(files.iter().filter(|f| f.ends_with(".safetensors")).count() >= 2);
    let sha256sum = Command::new("sha256sum")
        .args(["-c", "--quiet", "-"])
        .current_dir(&target)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn();
    if let Ok(mut child) = sha256sum {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "sha256sum -c disagrees with the manifest");
    }
    assert!(stderr(&output).contains("verified"), "{}", stderr(&output));

    // The folder runs: greedy generation over the 301-token vocabulary.
    let output = run(vicuna().arg("generate").arg("--model").arg(&target).args([
        "--ids",
        "1,5,7,300",
        "--greedy",
        "--max-new-tokens",
        "6",
        "--json",
    ]));
    assert_ok(&output);
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    let ids = json["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 6, "{json}");
    assert!(ids.iter().all(|id| id.as_u64().unwrap() < 301));
}

#[test]
fn broken_pairs_exit_2_naming_the_tensor_and_leave_nothing() {
    for (case, tensor) in [
        ("delta-bad-shape", "model.layers.1.mlp.up_proj.weight: base shape [172, 64], delta shape [171, 64]"),
        ("delta-missing-tensor", "model.layers.1.self_attn.v_proj.weight is missing from the delta"),
    ] {
        let tmp = TempDir::new(case);
        let target = tmp.join("target");
        let output = run(apply(&fixture("delta/base"), &fixture(&format!("delta/{case}")), &target));
        assert_eq!(output.status.code(), Some(2), "{case}");
        let message = stderr(&output);
        assert!(message.contains(tensor), "{case}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{case}: one line: {message}");
        assert!(!target.exists(), "{case}");
        assert!(leftovers(&tmp.0, "target").is_empty(), "{case}");
    }
}

#[test]
fn an_existing_target_is_refused_without_force() {
    let tmp = TempDir::new("exists");
    let target = tmp.join("target");
    std::fs::create_dir(&target).unwrap();
    let output = run(apply(&fixture("delta/base"), &fixture("delta/delta"), &target));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--force"), "{}", stderr(&output));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "the existing folder is untouched");
    assert_ok(&run(apply(&fixture("delta/base"), &fixture("delta/delta"), &target).arg("--force")));
    assert!(target.join("config.json").is_file());
}

#[test]
fn a_full_disk_fails_cleanly() {
    // A file-size limit makes writes fail the way a full disk does (EFBIG instead of ENOSPC; the
    // binary ignores the SIGXFSZ that would otherwise kill it).
    use std::os::unix::process::CommandExt;
    let tmp = TempDir::new("full");
    let target = tmp.join("target");
    let mut command = apply(&fixture("delta/base"), &fixture("delta/delta"), &target);
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 100_000, rlim_max: 100_000 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let output = run(&mut command);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("cannot write") && message.contains("model-00001-of-00001.safetensors"), "{message}");
    assert!(message.contains("writing tensor model."), "{message}");
    assert!(!target.exists());
    assert!(leftovers(&tmp.0, "target").is_empty(), "{:?}", leftovers(&tmp.0, "target"));
}

/// A base / delta pair large enough (~100 MB each) that a run can be interrupted mid-write.
fn large_pair(tmp: &TempDir) -> (PathBuf, PathBuf) {
    for (name, vocab, seed) in [("base", "400000", "1"), ("delta", "400001", "2")] {
        assert_ok(&run(vicuna()
            .args(["synth", "--shape", "tiny", "--quiet", "--vocab", vocab, "--seed", seed])
            .arg("--out")
            .arg(tmp.join(name))));
    }
    (tmp.join("base"), tmp.join("delta"))
}

/// Starts apply-delta and sends `signal` once its temporary folder holds a shard being written.
fn interrupt(base: &Path, delta: &Path, target: &Path, signal: libc::c_int) -> (Output, bool) {
    let mut child = apply(base, delta, target)
        .args(["--shard-size", "30MB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let temp = target.with_file_name(format!(".{name}.vicuna-partial-{}", child.id()));
    let start = Instant::now();
    let mut seen = false;
    while start.elapsed() < Duration::from_secs(60) {
        let writing = std::fs::read_dir(&temp)
            .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".safetensors")))
            .unwrap_or(false);
        if writing {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    (child.wait_with_output().unwrap(), seen)
}

#[test]
fn interrupted_runs_leave_no_target() {
    let tmp = TempDir::new("interrupt");
    let (base, delta) = large_pair(&tmp);
    let target = tmp.join("target");

    // SIGINT and SIGTERM: the handler stops the job, which removes its temporary folder.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (output, seen) = interrupt(&base, &delta, &target, signal);
        assert!(seen, "the run ended before it could be interrupted: {}", stderr(&output));
        assert_eq!(output.status.code(), Some(130), "signal {signal}: {}", stderr(&output));
        assert!(stderr(&output).contains("interrupted"), "{}", stderr(&output));
        assert!(!target.exists(), "signal {signal}: a target was left");
        assert!(leftovers(&tmp.0, "target").is_empty(), "signal {signal}: {:?}", leftovers(&tmp.0, "target"));
    }

    // SIGKILL cannot be handled: the temporary folder stays (never the target), and the next run
    // removes it — its lock died with the process.
    let (output, seen) = interrupt(&base, &delta, &target, libc::SIGKILL);
    assert!(seen && output.status.code().is_none(), "killed mid-write");
    assert!(!target.exists());
    assert!(!leftovers(&tmp.0, "target").is_empty(), "a killed run leaves its temporary folder");
    let output = run(apply(&base, &delta, &target).arg("--quiet"));
    assert_ok(&output);
    assert!(target.join("model.safetensors.index.json").is_file());
    assert!(leftovers(&tmp.0, "target").is_empty(), "{:?}", leftovers(&tmp.0, "target"));
}

#[test]
fn make_delta_is_target_minus_base_in_float16() {
    let tmp = TempDir::new("make");
    let (reference_dir, reference) = reference_target();
    let delta_dir = tmp.join("delta");
    let output = run(vicuna()
        .args(["make-delta", "--quiet", "--base"])
        .arg(fixture("delta/base"))
        .arg("--target")
        .arg(&reference_dir.0)
        .arg("--delta")
        .arg(&delta_dir));
    assert_ok(&output);
    let base = Checkpoint::open(&fixture("delta/base")).unwrap();
    let delta = Checkpoint::open(&delta_dir).unwrap();
    for name in reference.names() {
        let (t, d) = (reference.to_f32(name).unwrap(), delta.to_f32(name).unwrap());
        let mut b = base.to_f32(name).unwrap();
        b.resize(t.len(), 0.0);
        for i in 0..t.len() {
            // float64 holds the exact difference of two float16 values; round it once.
            let want = f16::from_f64(t[i] as f64 - b[i] as f64).to_f32();
            assert_eq!(d[i].to_bits(), want.to_bits(), "{name}[{i}]");
        }
    }
    let config: Value = serde_json::from_slice(&std::fs::read(delta_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 301);
}

#[test]
fn synth_writes_a_model_that_generates() {
    let tmp = TempDir::new("synth");
    let out = tmp.join("tiny");
    let output = run(vicuna().args(["synth", "--shape", "tiny", "--seed", "3", "--out"]).arg(&out));
    assert_ok(&output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 4, "config, generation config, shard, index");
    let output = run(vicuna().arg("generate").arg("--model").arg(&out).args([
        "--tokenizer",
        fixture("tokenizer/tokenizer.model").to_str().unwrap(),
        "--prompt",
        "### Human: What is a llama?",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
        "--json",
    ]));
    assert_ok(&output);
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["ids"].as_array().unwrap().len(), 8, "{json}");
    // Writing it again needs --force; a bad size is refused with the flag named.
    let again = run(vicuna().args(["synth", "--shape", "tiny", "--out"]).arg(&out));
    assert_eq!(again.status.code(), Some(2));
    let bad = run(vicuna().args(["synth", "--shape", "tiny", "--shard-size", "5XB", "--out"]).arg(tmp.join("x")));
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--shard-size"), "{}", stderr(&bad));
}

#[test]
fn transformers_loads_the_output_and_agrees_with_score() {
    let Some(python) = python_with_transformers() else {
        eprintln!("skipped: no Python with torch and transformers (set VICUNA_PYTHON to an interpreter that has them)");
        return;
    };
    let tmp = TempDir::new("hf");
    let target = tmp.join("target");
    assert_ok(&run(apply(&fixture("delta/base"), &fixture("delta/delta"), &target).arg("--quiet")));
    let ids = "1,5,7,300,9,42,299,3";
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf_logits.py");
    let hf = Command::new(&python).arg(script).arg(&target).arg(ids).output().unwrap();
    assert!(hf.status.success(), "transformers failed: {}", stderr(&hf));
    let hf: Value = serde_json::from_slice(&hf.stdout).unwrap();
    let ours = run(vicuna().arg("score").arg("--model").arg(&target).args(["--ids", ids, "--json", "--full-logits"]));
    assert_ok(&ours);
    let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
    let (a, b) = (hf["last_logits"].as_array().unwrap(), ours["last_logits"].as_array().unwrap());
    assert_eq!(a.len(), 301);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
        assert!((x - y).abs() <= 1e-3, "logit {i}: transformers {x}, vicuna {y}");
    }
    for (i, (x, y)) in hf["logprobs"].as_array().unwrap().iter().zip(ours["logprobs"].as_array().unwrap()).enumerate() {
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-3, "logprob {i}: transformers {x}, vicuna {y}"),
            (None, None) => {}
            other => panic!("logprob {i}: {other:?}"),
        }
    }
    eprintln!("transformers and vicuna score agree within 1e-3 ({python})");
}
