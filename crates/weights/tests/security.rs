//! Hostile PyTorch checkpoints: the restricted unpickler refuses every global outside its
//! allow-list before anything happens, and no malformed input makes it panic.

mod common;

use common::{expect_err, fixture, read_zip, write_torch_zip, write_zip, Pickle, Rng, TempDir, ZipOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use vicuna_weights::Checkpoint;

/// The classic payload: `module.name('echo pwned > FILE')`.
fn payload(module: &str, name: &str, witness: &Path) -> Vec<u8> {
    Pickle::new()
        .global(module, name)
        .short_str(&format!("echo pwned > {}", witness.display()))
        .op(0x85) // TUPLE1
        .reduce()
        .stop()
}

#[test]
fn refuses_code_execution_globals() {
    for (module, name) in [
        ("os", "system"),
        ("builtins", "eval"),
        ("__builtin__", "getattr"),
        ("subprocess", "Popen"),
        ("posix", "system"),
        ("torch", "load"),
        ("torch.storage", "_load_from_bytes"),
    ] {
        let dir = TempDir::new("evil");
        let witness = dir.join("pwned");
        let bin = dir.join("pytorch_model.bin");
        write_torch_zip(&bin, &payload(module, name, &witness), &[], "little", ZipOptions::default());
        let message = expect_err(Checkpoint::open(dir.path()), &[]);
        assert_eq!(message, format!("refusing to load pickle global {module}.{name} from {}", bin.display()));
        assert!(!witness.exists(), "{module}.{name} ran");
    }
}

#[test]
fn refuses_stack_global_and_globals_hidden_after_real_tensors() {
    let dir = TempDir::new("evil4");
    let witness = dir.join("pwned");
    let bin = dir.join("pytorch_model.bin");
    // Protocol 4 spelling: STACK_GLOBAL takes module and name from the stack.
    let pickle = Pickle(vec![0x80, 4])
        .short_str("os")
        .short_str("system")
        .op(0x93)
        .short_str(&format!("echo pwned > {}", witness.display()))
        .op(0x85)
        .reduce()
        .stop();
    write_torch_zip(&bin, &pickle, &[], "little", ZipOptions::default());
    expect_err(
        Checkpoint::open(dir.path()),
        &[&format!("refusing to load pickle global os.system from {}", bin.display())],
    );

    // A valid tensor first, then the payload as a dict value.
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("model.norm.weight")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .str("evil")
        .global("builtins", "exec")
        .str("import os; os.system('echo pwned')")
        .op(0x85)
        .reduce()
        .op(b'u')
        .stop();
    write_torch_zip(&bin, &pickle, &[("0", vec![0u8; 16])], "little", ZipOptions::default());
    expect_err(Checkpoint::open(dir.path()), &["refusing to load pickle global builtins.exec from"]);
    assert!(!witness.exists());
}

#[test]
fn refusal_happens_in_sharded_folders_too() {
    let dir = TempDir::copy_of("models/tiny-a/bin-sharded-f16");
    let witness = dir.join("pwned");
    let shard = dir.join("pytorch_model-00002-of-00002.bin");
    write_torch_zip(&shard, &payload("os", "system", &witness), &[], "little", ZipOptions::default());
    expect_err(
        Checkpoint::open(dir.path()),
        &[&format!("refusing to load pickle global os.system from {}", shard.display())],
    );
    assert!(!witness.exists());
}

/// Malformed pickles that target the VM itself.
#[test]
fn hostile_pickles_fail_cleanly() {
    let deep: Vec<u8> = {
        let mut p = Pickle::new().op(b')');
        for _ in 0..100_000 {
            p = p.op(0x85); // TUPLE1, nesting ever deeper
        }
        p.stop()
    };
    let doubling: Vec<u8> = {
        // l = []; repeat: l = [l, l] — exponential if values were deep-copied.
        let mut p = Pickle::new().op(b']').put(0);
        for _ in 0..10_000 {
            p = p.mark().get(0).get(0).op(b'l').put(0).op(b'0');
        }
        p.get(0).stop()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("deep nesting", deep, "nested deeper"),
        ("memo doubling", doubling, "nested deeper"),
        ("string length past the end", Pickle::new().op(b'X').raw(&u32::MAX.to_le_bytes()).stop(), "more bytes"),
        ("8-byte string length", Pickle::new().op(0x8d).raw(&u64::MAX.to_le_bytes()).stop(), "data.pkl is malformed"),
        ("stack underflow", Pickle::new().op(b'R').stop(), "stack underflow"),
        ("underflow through a mark", Pickle::new().op(b'}').mark().op(b's').stop(), "stack underflow"),
        ("memo miss", Pickle::new().get(7).stop(), "memo entry 7 was never stored"),
        ("no STOP", Pickle::new().op(b'}').0, "without STOP"),
        ("unknown opcode", Pickle::new().op(b'i').stop(), "opcode 0x69"),
        ("REDUCE on a string", Pickle::new().str("x").op(b')').reduce().stop(), "REDUCE calls a str"),
        ("not a dict", Pickle::new().op(b']').stop(), "holds a list, not a state dict"),
        ("huge integer", Pickle::new().op(0x8a).raw(&[200]).raw(&[1; 200]).stop(), "too large"),
        ("bad persistent id", Pickle::new().str("x").op(b'Q').stop(), "persistent id"),
        ("non-tensor entry", Pickle::new().op(b'}').str("epoch").int(3).op(b's').stop(), "entry epoch holds an int"),
        ("SETITEMS odd", Pickle::new().op(b'}').mark().str("a").op(b'u').stop(), "odd number"),
    ];
    for (what, pickle, expected) in cases {
        let dir = TempDir::new("hostile");
        write_torch_zip(&dir.join("pytorch_model.bin"), &pickle, &[], "little", ZipOptions::default());
        let result = catch_unwind(AssertUnwindSafe(|| Checkpoint::open(dir.path())));
        let result = result.unwrap_or_else(|_| panic!("{what}: panicked"));
        let message = expect_err(result, &[expected]);
        assert!(message.contains("pytorch_model.bin"), "{what}: {message}");
    }
}

/// The entries of a real shard, for mutating.
fn real_shard() -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(fixture("models/tiny-a/bin-sharded-f16/pytorch_model-00001-of-00002.bin")).unwrap();
    read_zip(&bytes)
}

/// Opens `dir`, turning a panic into a test failure that names the mutation.
fn open_without_panic(dir: &Path, what: &str) {
    match catch_unwind(AssertUnwindSafe(|| Checkpoint::open(dir))) {
        Err(_) => panic!("panicked on {what}"),
        Ok(Ok(ckpt)) => {
            // Whatever opened must also read without panicking.
            for name in ckpt.names() {
                let _ = ckpt.to_f32(name);
            }
        }
        Ok(Err(e)) => assert!(!e.to_string().contains('\n'), "{what}: multi-line error {e}"),
    }
}

#[test]
fn mutated_data_pkl_never_panics() {
    let entries = real_shard();
    let pkl_index = entries.iter().position(|(n, _)| n.ends_with("/data.pkl")).unwrap();
    let original = entries[pkl_index].1.clone();
    let dir = TempDir::new("fuzz-pkl");
    let bin = dir.join("pytorch_model.bin");
    let mut rng = Rng::new(0x5eed_1234);
    let mut opened = 0;
    for round in 0..400 {
        let mut pkl = original.clone();
        let kind = round % 4;
        match kind {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(pkl.len());
                    pkl[at] = rng.next() as u8;
                }
            }
            1 => pkl.truncate(rng.below(pkl.len())),
            2 => {
                let at = rng.below(pkl.len());
                pkl[at] ^= 1 << rng.below(8);
            }
            _ => {
                let at = rng.below(pkl.len());
                pkl.remove(at);
            }
        }
        let mut mutated = entries.clone();
        mutated[pkl_index].1 = pkl;
        write_zip(&bin, &mutated, ZipOptions::default());
        open_without_panic(dir.path(), &format!("data.pkl mutation round {round}"));
        opened += usize::from(Checkpoint::open(dir.path()).is_ok());
    }
    // Some mutations (inside tensor names, say) still give a valid file; most must not.
    assert!(opened < 400);
}

#[test]
fn mutated_archives_and_headers_never_panic() {
    let mut rng = Rng::new(42);
    let shard = std::fs::read(fixture("models/tiny-a/bin-sharded-f16/pytorch_model-00002-of-00002.bin")).unwrap();
    let st = std::fs::read(fixture("models/tiny-a/safetensors-f16/model.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let dir = TempDir::new("fuzz-files");
    for round in 0..300 {
        let (name, mut bytes) =
            if round % 2 == 0 { ("pytorch_model.bin", shard.clone()) } else { ("model.safetensors", st.clone()) };
        if round % 6 < 2 {
            bytes.truncate(rng.below(bytes.len()));
        } else {
            // Flip bytes where the structure is: the zip's directory (at the end) and
            // local headers, or the safetensors header (at the start).
            for _ in 0..1 + rng.below(3) {
                let at = if name == "model.safetensors" {
                    rng.below(header_end)
                } else if rng.below(2) == 0 {
                    bytes.len() - 1 - rng.below(bytes.len().min(1500))
                } else {
                    rng.below(bytes.len())
                };
                bytes[at] = rng.next() as u8;
            }
        }
        let _ = std::fs::remove_file(dir.join("pytorch_model.bin"));
        let _ = std::fs::remove_file(dir.join("model.safetensors"));
        std::fs::write(dir.join(name), &bytes).unwrap();
        open_without_panic(dir.path(), &format!("{name} mutation round {round}"));
    }
}
